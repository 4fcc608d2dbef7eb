"""The exception tree of feed/errors.py is complete: every public exception
class defined in feed/ and streaming/ derives from OddsfeedError and is drawn
in the docstring of feed.errors."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import feed
import feed.errors
import streaming




def _public_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for pkg in (feed, streaming):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if info.name.endswith(".__main__"):  # runs the CLI
                continue
            module = importlib.import_module(info.name)
            for name, obj in vars(module).items():
                if (inspect.isclass(obj) and issubclass(obj, BaseException) and not name.startswith("_")
                        and obj.__module__ == module.__name__):
                    found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_public_exception_is_in_the_tree() -> None:
    found = _public_exceptions()
    assert "feed.store.EpochChanged" in found and "streaming.auth.AuthError" not in found
    outside = sorted(q for q, cls in found.items() if not issubclass(cls, feed.errors.OddsfeedError))
    assert not outside, f"not under OddsfeedError: {outside}"
    doc = feed.errors.__doc__ or ""
    undrawn = sorted(q for q, cls in found.items() if cls.__name__ not in doc.split())
    assert not undrawn, f"missing from the drawing in feed/errors.py: {undrawn}"


def test_one_auth_error() -> None:
    from feed.sources import http_limits
    from streaming import auth

    assert auth.AuthError is http_limits.AuthError is feed.errors.AuthError
    assert issubclass(http_limits.SourceAuthError, feed.errors.AuthError)
    assert issubclass(http_limits.SourceAuthError, feed.errors.FatalSourceError)
    assert not hasattr(feed.errors, "SequenceError")
