"""The public surface is small, explicit, sorted, and importable without side effects."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import s3pipes


def test_all_is_sorted_and_importable() -> None:
    assert s3pipes.__all__ == sorted(s3pipes.__all__)
    for name in s3pipes.__all__:
        assert hasattr(s3pipes, name), name


IMPORT_PROBE = textwrap.dedent(
    """
    import os, socket, sys, traceback

    offenders = []

    def ours():
        # The frame that touched os.environ, when it is s3pipes code. Libraries we import
        # (fsspec's config, say) read their own settings at import; that is theirs to own.
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename.endswith(("os.py", "_collections_abc.py")):
            frame = frame.f_back
        if frame is not None and "/s3pipes/" in frame.f_code.co_filename.replace(os.sep, "/"):
            return frame.f_code.co_filename + ":" + str(frame.f_lineno)
        return None

    class Recording(os._Environ):
        def __getitem__(self, key):
            where = ours()
            if where:
                offenders.append(("env", key, where))
            return super().__getitem__(key)

        def get(self, key, default=None):
            where = ours()
            if where:
                offenders.append(("env", key, where))
            return super().get(key, default)

        def __contains__(self, key):
            where = ours()
            if where:
                offenders.append(("env", key, where))
            return super().__contains__(key)

    env = os.environ
    os.environ = Recording(env._data, env.encodekey, env.decodekey, env.encodevalue, env.decodevalue)

    def no_network(*args, **kwargs):
        offenders.append(("network", args[:2], "".join(traceback.format_stack(limit=6))))
        raise OSError("network used during import")

    socket.socket.connect = no_network
    socket.getaddrinfo = no_network
    socket.create_connection = no_network

    import s3pipes  # noqa: E402

    print(repr(offenders))
    """
)


def test_import_reads_no_environment_and_opens_no_connection() -> None:
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
