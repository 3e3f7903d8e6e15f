"""Copy-on-write jsonpatch: a patch applied to a whole workspace, copying only what it changes.

pyhf applies a patch with ``jsonpatch`` to a deep copy of the whole (multi-megabyte) workspace;
:func:`apply_patch` gives the same document while sharing every untouched part with the original,
which also lets :class:`~pyhf_dist.runtime.fast.layout.SampleCache` recognise untouched samples by identity.
"""

from __future__ import annotations

import copy

from pyhf_dist.runtime.fast.errors import FastPathUnsupported

__all__ = ["apply_patch"]


def apply_patch(document: dict, operations: list) -> dict:
    """Apply jsonpatch ``operations`` to ``document`` without modifying it, copying only what changes.

    pyhf applies patches with ``jsonpatch``, which deep-copies the whole (multi-megabyte) spec per
    patch; copy-on-write along each operation's path gives the same result for a fraction of the
    cost. Operations other than add/remove/replace/test go through ``jsonpatch`` itself.

    Raises:
        FastPathUnsupported: An operation that does not apply (pyhf would raise on it too).
    """
    if any(op.get("op") not in ("add", "remove", "replace", "test") for op in operations):
        import jsonpatch

        try:
            return jsonpatch.JsonPatch(operations).apply(copy.deepcopy(document))
        except Exception as error:
            raise FastPathUnsupported(f"patch does not apply: {error}") from None
    root = dict(document)
    owned = {id(root)}
    for op in operations:
        try:
            tokens = _pointer(op["path"])
            if not tokens:
                raise FastPathUnsupported("patch operations on the document root")
            parent = root
            for token in tokens[:-1]:
                key = _key(parent, token, append=False)
                child = parent[key]
                if id(child) not in owned:
                    child = list(child) if isinstance(child, list) else dict(child)
                    owned.add(id(child))
                    parent[key] = child
                parent = child
            last = tokens[-1]
            kind = op["op"]
            if kind == "test":
                if parent[_key(parent, last, append=False)] != op["value"]:
                    raise FastPathUnsupported(f"patch test failed at {op['path']}")
            elif kind == "remove":
                del parent[_key(parent, last, append=False)]
            elif kind == "replace":
                key = _key(parent, last, append=False)
                parent[key]  # must exist, as in jsonpatch
                parent[key] = op["value"]
            elif isinstance(parent, list):
                parent.insert(_key(parent, last, append=True), op["value"])
            else:
                parent[last] = op["value"]
        except FastPathUnsupported:
            raise
        except (KeyError, IndexError, TypeError, ValueError) as error:
            raise FastPathUnsupported(f"patch operation {op!r:.80} does not apply: {error!r}") from None
    return root


def _pointer(path: str) -> list:
    if path == "":
        return []
    if not path.startswith("/"):
        raise ValueError(f"invalid JSON pointer {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _key(container, token: str, append: bool):
    if isinstance(container, dict):
        if not append and token not in container:
            raise KeyError(token)
        return token
    if token == "-" and append:
        return len(container)
    if not token.isdigit() or (len(token) > 1 and token[0] == "0"):
        raise ValueError(f"invalid list index {token!r}")
    index = int(token)
    if index > len(container) or (not append and index == len(container)):
        raise IndexError(token)
    return index
