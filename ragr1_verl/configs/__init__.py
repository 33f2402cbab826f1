"""Config files shipped with the plugin (agent-loop and tool YAMLs), found by path from verl's workers."""
