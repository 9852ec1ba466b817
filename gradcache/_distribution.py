"""What this library is called on the package index, and what to tell a user to install.

The import names are ``gradcache``, ``gradcache_torch``, ``gradcache_jax``, ``gradcache_tf`` and
``gradcache_cli``; the distribution is :data:`DISTRIBUTION`, because the name ``gradcache`` on the
package index belongs to the original GradCache code (0.0.1, 2022), whose top-level module is also
called ``gradcache``. Every message that tells a user what to install is built by
:func:`install_hint`, so it names the right distribution and extra. :func:`conflicting_original`
finds that original distribution in the environment, where it and this library write the same
``gradcache/`` folder (uninstalling it later deletes files of this library).
"""

from __future__ import annotations

DISTRIBUTION = "gradient-cache"
ORIGINAL = "gradcache"  # the original GradCache's distribution, versions 0.0.x


def install_hint(extra: str | None = None) -> str:
    """The command that installs this library, with ``extra`` when a feature needs one.

    >>> install_hint("torch")
    "pip install 'gradient-cache[torch]'"
    >>> install_hint()
    'pip install gradient-cache'
    """
    return f"pip install '{DISTRIBUTION}[{extra}]'" if extra else f"pip install {DISTRIBUTION}"


def conflicting_original() -> str | None:
    """One line saying that the original GradCache distribution is installed here, or ``None``.

    Read from the environment's package metadata (no import of the other package). Only its own
    versions (0.0.x) count: an editable checkout of this library installed under the old name
    ``gradcache`` (0.1 and later) is not the other package.
    """
    import importlib.metadata

    try:
        version = importlib.metadata.version(ORIGINAL)
    except importlib.metadata.PackageNotFoundError:
        return None
    if not version.startswith("0.0."):
        return None
    return (f"the unrelated '{ORIGINAL}' {version} distribution (the original GradCache) is "
            f"installed and shares the import name 'gradcache' with {DISTRIBUTION}; fix: "
            f"pip uninstall -y {ORIGINAL} {DISTRIBUTION}, then reinstall with your extras: "
            f"{install_hint('torch')} (README: Migrating from the original GradCache package)")
