"""Loaded at start-up by every Python process whose PYTHONPATH holds this folder (the serve test's server and
its worker ranks). With XDIT_PICKLE_GUARD_LOG set, it records every call of pickle.load(s) and of
torch.distributed's object collectives (broadcast_object_list and anything else that unpickles received
bytes through ``_tensor_to_object``) to that file, with a stack, so a test can fail on any of them."""
import os

_LOG = os.environ.get("XDIT_PICKLE_GUARD_LOG")

if _LOG:
    import importlib.abc
    import pickle
    import sys
    import traceback

    def _record(name):
        with open(_LOG, "a") as f:
            f.write(f"pid {os.getpid()} called {name}\n{''.join(traceback.format_stack(limit=12)[:-2])}\n")

    def _wrap(obj, attr, name):
        orig = getattr(obj, attr)

        def wrapper(*a, **k):
            _record(name)
            return orig(*a, **k)
        setattr(obj, attr, wrapper)

    _wrap(pickle, "loads", "pickle.loads")
    _wrap(pickle, "load", "pickle.load")

    class _PatchC10d(importlib.abc.MetaPathFinder):
        """Wrap torch.distributed.distributed_c10d's object collectives right after it is imported."""

        def find_spec(self, fullname, path, target=None):
            if fullname != "torch.distributed.distributed_c10d":
                return None
            sys.meta_path.remove(self)
            import importlib.util
            spec = importlib.util.find_spec(fullname)
            sys.meta_path.insert(0, self)
            exec_module = spec.loader.exec_module

            def patched(module):
                exec_module(module)
                for name in ("broadcast_object_list", "_tensor_to_object", "recv_object_list",
                             "all_gather_object", "gather_object", "scatter_object_list"):
                    if hasattr(module, name):
                        _wrap(module, name, f"torch.distributed.{name}")
            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, _PatchC10d())
    with open(_LOG + ".installed", "a") as f:
        f.write(f"{os.getpid()}\n")
