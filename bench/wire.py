"""Just enough wire formats for the harness: ChangeEvent.commit_time out of a
protobuf body, and Commit timestamps out of pg_recvlogical's pgoutput output.
"""

import struct

PG_EPOCH_UNIX_US = 946684800 * 1_000_000  # 2000-01-01 in Unix microseconds


def _varint(buf, i):
    shift = 0
    result = 0
    while True:
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7


def _skip(buf, i, wire):
    if wire == 0:
        _, i = _varint(buf, i)
        return i
    if wire == 1:
        return i + 8
    if wire == 2:
        n, i = _varint(buf, i)
        return i + n
    if wire == 5:
        return i + 4
    raise ValueError(f"unsupported wire type {wire}")


def _timestamp_us(body, i, end):
    secs = nanos = 0
    while i < end:
        k, i = _varint(body, i)
        if k == 0x08:
            secs, i = _varint(body, i)
        elif k == 0x10:
            nanos, i = _varint(body, i)
        else:
            i = _skip(body, i, k & 7)
    return secs * 1_000_000 + nanos // 1000


def _string_field(body, i, end, field):
    while i < end:
        k, i = _varint(body, i)
        if k == (field << 3) | 2:
            ln, i = _varint(body, i)
            return body[i:i + ln].decode(errors="replace")
        i = _skip(body, i, k & 7)
    return None


def commit_time_us(body):
    """ChangeEvent field 8 (commit_time, google.protobuf.Timestamp) in Unix µs."""
    return event_fields(body)[0]


def event_fields(body):
    """(commit_time in Unix µs, task title or None) of a ChangeEvent:
    fields 8 (commit_time) and 13 (task) → Task field 4 (title)."""
    i = 0
    n = len(body)
    commit = title = None
    while i < n:
        key, i = _varint(body, i)
        field, wire = key >> 3, key & 7
        if wire == 2 and field in (8, 13):
            ln, i = _varint(body, i)
            if field == 8:
                commit = _timestamp_us(body, i, i + ln)
            else:
                title = _string_field(body, i, i + ln, 4)
            i += ln
            continue
        i = _skip(body, i, wire)
    return commit, title


class PgoutputCommits:
    """Incremental parser of pg_recvlogical's output for pgoutput proto 1:
    each message's bytes followed by a newline. Calls on_commit(unix_us,
    text) per Commit message, `text` being column `column` (0-based) of the
    transaction's last inserted row (None if it inserted none)."""

    def __init__(self, on_commit, column=3):
        self.buf = b""
        self.on_commit = on_commit
        self.column = column
        self.last_text = None

    def feed(self, data):
        self.buf += data
        buf = self.buf
        i = 0
        n = len(buf)
        while i < n:
            end = self._message_end(buf, i)
            if end is None or end >= n:
                break  # incomplete (or the trailing newline not read yet)
            if buf[i] == 0x43:  # 'C'
                ts = struct.unpack_from(">q", buf, i + 18)[0]
                self.on_commit(ts + PG_EPOCH_UNIX_US, self.last_text)
                self.last_text = None
            elif buf[i] == 0x49:  # 'I'
                self.last_text = self._column_text(buf, i + 6, self.column)
            i = end + 1  # skip the '\n' pg_recvlogical appends
        self.buf = buf[i:]

    @staticmethod
    def _cstr(buf, i):
        j = buf.find(b"\0", i)
        if j < 0:
            raise IndexError
        return j + 1

    def _tuple(self, buf, i):
        ncols = struct.unpack_from(">h", buf, i)[0]
        i += 2
        for _ in range(ncols):
            kind = buf[i]
            i += 1
            if kind in (0x74, 0x62):  # 't', 'b'
                ln = struct.unpack_from(">i", buf, i)[0]
                i += 4 + ln
        return i

    @staticmethod
    def _column_text(buf, i, col):
        ncols = struct.unpack_from(">h", buf, i)[0]
        i += 2
        for c in range(ncols):
            kind = buf[i]
            i += 1
            if kind in (0x74, 0x62):
                ln = struct.unpack_from(">i", buf, i)[0]
                if c == col:
                    return buf[i + 4:i + 4 + ln].decode(errors="replace")
                i += 4 + ln
            elif c == col:
                return None
        return None

    def _message_end(self, buf, i):
        """Index just past the message at i, or None if incomplete."""
        try:
            t = buf[i]
            if t == 0x42:  # Begin
                end = i + 21
            elif t == 0x43:  # Commit
                end = i + 26
            elif t == 0x4F:  # Origin
                end = self._cstr(buf, i + 9)
            elif t == 0x52:  # Relation
                j = self._cstr(buf, i + 5)
                j = self._cstr(buf, j)
                j += 1
                ncols = struct.unpack_from(">h", buf, j)[0]
                j += 2
                for _ in range(ncols):
                    j = self._cstr(buf, j + 1) + 8
                end = j
            elif t == 0x59:  # Type
                j = self._cstr(buf, i + 5)
                end = self._cstr(buf, j)
            elif t == 0x49:  # Insert: relid, 'N', tuple
                end = self._tuple(buf, i + 6)
            elif t == 0x55:  # Update: relid, ['K'|'O' tuple], 'N' tuple
                j = i + 5
                if buf[j] in (0x4B, 0x4F):
                    j = self._tuple(buf, j + 1)
                end = self._tuple(buf, j + 1)
            elif t == 0x44:  # Delete: relid, 'K'|'O', tuple
                end = self._tuple(buf, i + 6)
            elif t == 0x54:  # Truncate
                nrel = struct.unpack_from(">i", buf, i + 1)[0]
                end = i + 6 + 4 * nrel
            elif t == 0x4D:  # Message: flags, lsn, prefix, len, content
                j = self._cstr(buf, i + 10)
                ln = struct.unpack_from(">i", buf, j)[0]
                end = j + 4 + ln
            else:
                raise ValueError(f"unknown pgoutput message {t:#x}")
        except (IndexError, struct.error):
            return None
        return end if end <= len(buf) else None
