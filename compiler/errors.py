"""One error base for everything a user can cause. The CLI prints `error: <message>` (+ hint), exit 2.

Messages say what, where (file / node / field) and what to do. `assert` is for internal invariants only.
"""


class BnncError(Exception):
    """A problem with the user's input or request; never a bug in bnnc."""

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class BnncWarning(UserWarning):
    """Something bnnc did to the user's input that they should know about, though it is no error
    (a node nothing reads, dropped). The CLI prints `warning: <message>`, one line each."""


class ModelError(BnncError):
    """The ONNX file cannot be read, or holds something bnnc cannot compile."""


class UnsupportedModelError(ModelError):
    """A well-formed model that uses an op, bit width or pattern bnnc does not handle."""


class ConfigError(BnncError):
    """A training option or combination of options that makes no sense (for this model)."""


class DataError(BnncError):
    """A dataset file/directory is missing or malformed, or labels are out of range."""


class ManifestError(DataError):
    """A compile output's bnnc_manifest.json lacks a field or holds one of the wrong type (written
    by another bnnc version, or edited)."""


class PlanError(BnncError):
    """The memory plan could not be built or failed verification."""


class BudgetError(BnncError):
    """The program does not fit the target's RAM/flash budget."""


class TargetError(BnncError):
    """Unknown target, or the target's toolchain/emulator is missing."""


class OutDirError(BnncError):
    """An output directory bnnc may not write: a symbolic link, files bnnc did not write, another
    bnnc working in it, or a filesystem that refuses the write (full, read-only)."""
