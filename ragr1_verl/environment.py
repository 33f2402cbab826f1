"""The environment variables the plugin reads, declared once, and the one place that reads them.

Every other module takes a variable's value from its :class:`EnvVar` here (``RETRIEVER_URL.value()``), so
the list below is all the environment that changes what ragr1-verl does (the reference page lists it).
Configuration itself lives in the ``ragr1:`` section and on the command line; these are the few things a
user sets once per machine or job (where the retriever is, its token, the CPU backend, an API key).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class EnvVar:
    name: str
    help: str

    def value(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The variable's value, stripped; None when it is unset or empty."""
        value = (os.environ if environ is None else environ).get(self.name, "").strip()
        return value or None


RETRIEVER_URL = EnvVar("RAGR1_RETRIEVER_URL", "the retriever's `/retrieve` URL, or several comma-separated, "
                       "where neither the `ragr1` section nor the command line gives one")
RETRIEVER_TOKEN = EnvVar("RAGR1_RETRIEVER_TOKEN", "the retriever's bearer token, where neither the `ragr1` "
                         "section nor the command line gives one")
CPU_BACKEND = EnvVar("RAGR1_CPU_BACKEND", "`1`: verl runs on the CPU backend in this process and the Ray "
                     "processes it starts; `0`: never; unset: when the command line chooses a `ragr1_cpu*` or "
                     "`ragr1_sft_cpu*` recipe")
TEACHER_API_KEY = EnvVar("RAGR1_TEACHER_API_KEY", "`ragr1-data sft-generate`: the bearer token of the "
                         "teacher's OpenAI-compatible server (else `OPENAI_API_KEY`)")
OPENAI_API_KEY = EnvVar("OPENAI_API_KEY", "the bearer token of an OpenAI-compatible server: `ragr1-eval "
                        "--backend openai`, and the teacher where `RAGR1_TEACHER_API_KEY` is unset")

VARIABLES = (RETRIEVER_URL, RETRIEVER_TOKEN, CPU_BACKEND, TEACHER_API_KEY, OPENAI_API_KEY)
