"""The one exception type for bad input: the CLI prints its message on one line and exits 2."""

import re
from contextlib import contextmanager


class UserError(Exception):
    """Bad input from the user. The message names the input and the fix, on one line."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(message.split()))


# errno values that mean "the disk (or this process's file-size limit) has no room"
NO_ROOM_ERRNOS = {28: "no space left on device", 27: "file too large", 122: "disk quota exceeded"}
NO_ROOM_TEXTS = {"no space left on device": 28, "os error 28": 28, "file too large": 27,
                 "os error 27": 27, "disk quota exceeded": 122, "os error 122": 122}


def no_room_reason(exc: BaseException | None) -> str | None:
    """Why a write failed for lack of room, or None when `exc` is something else. Libraries
    wrap the OS error in their own types (safetensors, onnx, a measuring child's message),
    so the chain of causes is searched, by errno first and by the OS's wording second."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "errno", None) in NO_ROOM_ERRNOS:
            return NO_ROOM_ERRNOS[exc.errno]
        text = str(exc).lower()
        for phrase, errno in NO_ROOM_TEXTS.items():
            if phrase in text:
                return NO_ROOM_ERRNOS[errno]
        if isinstance(exc, OSError) and SHORT_WRITE.search(text):  # numpy's tofile
            return "a write stopped short (disk full)"
        exc = exc.__cause__ or exc.__context__
    return None

SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


@contextmanager
def no_room_is_user_error(out):
    """A write that fails for lack of disk room under `out` becomes one line naming it."""
    try:
        yield
    except Exception as exc:
        reason = no_room_reason(exc)
        if reason is None:
            raise
        raise UserError(f"cannot write to {out}: {reason}; free space there or choose another "
                        "--out") from exc
