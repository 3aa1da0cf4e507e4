"""Errors raised by the on-device runner.

Every message is one line and ends with a hint. ``exit_code`` is what the
``run.py`` / ``edgec`` CLIs exit with: 1 means a check failed, 2 means the bundle
or the environment is unusable (not a bundle, bad manifest, runtime missing).
"""


class BundleError(Exception):
    """Base class: a bundle cannot be used as it is."""

    exit_code = 2

    def __init__(self, message, hint=None):
        self.message = " ".join(str(message).split())
        self.hint = " ".join(str(hint).split()) if hint else None
        super().__init__(self.message)

    def __str__(self):
        if self.hint:
            return "%s (hint: %s)" % (self.message, self.hint)
        return self.message


class NotABundleError(BundleError):
    """The path is not a bundle directory (no manifest.json)."""


class ManifestError(BundleError):
    """manifest.json is unreadable, malformed or of an unsupported schema."""


class ManifestSealError(ManifestError):
    """manifest.json has no self-digest, or one its content does not match (see ``manifest_seal``):
    a failed check, like a changed file."""

    exit_code = 1


class SchemaTooNewError(ManifestError):
    """manifest.json has a schema_version newer than this runner understands."""


class IntegrityError(BundleError):
    """A file listed in the manifest is missing or differs (bytes / sha256)."""

    exit_code = 1

    def __init__(self, message, hint=None, problems=None):
        super().__init__(message, hint)
        self.problems = list(problems or [])


class RuntimeMissingError(BundleError):
    """The inference runtime package is not installed."""


class ModelLoadError(BundleError):
    """The model file does not load in the runtime (or disagrees with the manifest)."""


class SettingsError(BundleError):
    """Unknown or invalid runtime settings / runtime override."""
