"""Hydra search-path plugin: adds the ragr1-verl recipes, so ``main_ppo +recipe=ragr1`` finds them.

Hydra imports every module under ``hydra_plugins`` whenever any Hydra app starts, so this stays
import-light: no verl, torch or ragr1_verl imports.
"""

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


class RagR1SearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="ragr1-verl", path="pkg://ragr1_verl.recipes")
