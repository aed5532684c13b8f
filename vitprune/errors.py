"""Error kinds. Every user-facing failure is a :class:`VitpruneError`; the CLI prints its message on
one line and exits 2. Anything else escaping the API is a bug (exit 1)."""


class VitpruneError(Exception):
    """Base class: bad input or a request vitprune cannot honour. The message says what to do."""


class InputError(VitpruneError):
    """A file, flag or argument is wrong (missing, empty, corrupt, out of range)."""


class SpecError(InputError):
    """A compression spec (flags, JSON or YAML) is invalid."""


class LoadError(InputError):
    """A model could not be loaded (unknown architecture, state dict mismatch, untrusted pickle)."""


class UnsupportedModelError(VitpruneError):
    """The model cannot be traced or analysed (not a ViT, an op vitprune has no rule for, ...)."""


class PlanError(VitpruneError):
    """No plan meets the requested target (e.g. a FLOPs target below what the floors allow)."""


class OutputError(VitpruneError):
    """An output could not be written (no space left, permissions changed during the run); the
    files that were there before are left as they were."""


class ExportError(VitpruneError):
    """ONNX export, checking or ONNX Runtime parity failed."""


def one_line(text: object, limit: int | None = None) -> str:
    """``text`` with every run of whitespace (newlines included) as one space, cut at ``limit``:
    how every error reaches the user."""
    return " ".join(str(text).split())[:limit]
