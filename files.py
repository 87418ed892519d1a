"""Files: atomic writes (bytes, JSON, JSON lines), fsync of a directory, and reading rows of .jsonl, .json and
.parquet files with each bad row named. Plain Python, no torch: data/ imports it as well as the stages, common.py,
generation.py and model.py; it imports nothing of ours.
"""

import contextlib
import json
import os
import tempfile

# -----------------------------------------------------------------------------
# Atomic writes: temporary file beside the target, fsync, rename. Readers see the old file or the new one.


def _umask():
    """The process's umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path, mode="wb"):
    """
    A file object for a temporary file beside `path`; on a clean exit it is fsynced and renamed over `path`,
    so readers see old or new, never half; on an error it is removed. The file gets the mode a plain open()
    would give it (0666 less the umask), not mkstemp's 0600.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write(path, data):
    with atomic_open(path) as f:
        f.write(data)


def write_jsonl(path, rows):
    """Rows (any iterable, streamed) as JSON lines, atomically."""
    with atomic_open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_json(path, obj):
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)


def fsync_dir(directory):
    # Makes the renames themselves durable (POSIX); not possible on every platform, hence the guard.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# Reading rows

def check_utf8(text, field):
    # A JSON-escaped lone surrogate ("\ud800") decodes to a str that no UTF-8 file can hold.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"'{field}': lone surrogate at {e.start}") from None


def read_rows(path):
    """(where, row, error) per row of a .jsonl or .parquet file, or of a file holding one JSON list (alpaca_eval's
    .json files; a .json file of JSON lines, as Hugging Face exports them, reads as .jsonl); `where` is file:line,
    file row N or file item N."""
    is_list = False
    if path.endswith(".json"):
        with open(path, "rb") as f:
            is_list = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")
    if is_list:
        try:
            with open(path, encoding="utf-8-sig") as f:
                rows = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield f"{path} item {i + 1}", row, None
        return
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only for parquet input
        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i + 1}", row, None
        return
    with open(path, "rb") as f:  # bytes: one line of invalid UTF-8 is that line's problem, not the file's
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
            except UnicodeDecodeError as e:
                yield f"{path}:{n}", None, f"not valid UTF-8 (byte {e.start + 1})"
                continue
            try:
                yield f"{path}:{n}", json.loads(line), None
            except json.JSONDecodeError as e:
                yield f"{path}:{n}", None, f"not valid JSON ({e.msg} at column {e.colno})"


def parse_rows(path, parse, field, strict=False, limit=-1):
    """parse(row, file name) over the rows of `path` (config field `field`) -> (the parsed rows, in order, at most
    `limit` if > 0; one message per malformed row, naming it as file:line). A row parse cannot read raises
    ValueError saying why; with strict the first one stops the run."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"config {field}: {path} not found")
    parsed, malformed = [], []
    for where, row, error in read_rows(path):
        if error is None:
            try:
                parsed.append(parse(row, os.path.basename(path)))
            except ValueError as e:
                error = str(e)
        if error is not None:
            if strict:
                raise ValueError(f"{where}: {error} (strict=true)")
            malformed.append(f"{where}: {error}; skipped")
        elif len(parsed) == limit:
            break
    return parsed, malformed
