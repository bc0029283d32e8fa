"""Secrets never leave the process: the command line as locks, manifests and messages record it, with the value of
`--storage-options` (credentials, endpoints) and the password of a URL (`s3://KEY:SECRET@bucket`) replaced."""

from __future__ import annotations

import re
import shlex
import sys

SECRET_OPTIONS = ("--storage-options",)
HIDDEN = "<redacted>"
URL_PASSWORD = re.compile(r"(\w+://)[^/@\s:]*:[^/@\s]*@")  # scheme://user:password@


def command_line(argv: list[str] | None = None) -> str:
    """`argv` (default: this process's) as one line a shell would read back, secrets replaced."""
    words, hide = [], False
    for word in sys.argv if argv is None else argv:
        if hide:
            words.append(HIDDEN)
            hide = False
            continue
        flag, eq, _ = word.partition("=")
        if flag in SECRET_OPTIONS:
            words.append(f"{flag}={HIDDEN}" if eq else word)
            hide = not eq
            continue
        words.append(URL_PASSWORD.sub(rf"\1{HIDDEN}@", word))
    return " ".join(shlex.quote(w) if w != HIDDEN and not w.endswith(HIDDEN) else w for w in words)


def text(line: str) -> str:
    """A recorded command line (a lock written by an earlier version, say) with the value of `--storage-options`
    (a JSON object, which may hold spaces, or one word) and URL passwords replaced, for printing."""
    line = URL_PASSWORD.sub(rf"\1{HIDDEN}@", line)
    for option in SECRET_OPTIONS:
        start = line.find(option)
        while start >= 0:
            value = start + len(option)
            while value < len(line) and line[value] in " =":
                value += 1
            end = value
            if line[value : value + 1] in ("{", "'", '"'):
                depth = 0
                for end in range(value, len(line)):
                    depth += {"{": 1, "}": -1}.get(line[end], 0)
                    if depth == 0 and line[end] in "}'\"" and end > value:
                        break
                end += 1
            else:
                while end < len(line) and line[end] != " ":
                    end += 1
            line = f"{line[:value]}{HIDDEN}{line[end:]}"
            start = line.find(option, value + len(HIDDEN))
    return line
