"""Import stub for the GPU check only (scripts/gpu_check.sh puts it on the path when the
image has no `datasets`): transformer_lens imports it at start-up for helpers saetui never
calls; any name resolves to an empty placeholder class."""


def __getattr__(name: str) -> type:
    return type(name, (), {})
