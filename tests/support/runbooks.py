"""The lines of the runbooks' code blocks, split as a shell splits them, and how each one is exercised.

Every logical line of a fenced block in ``runbooks/*.md`` is one of:

- configuration (a block without a shell language: env files, journald.conf, daemon.json, nginx): its
  ``PLANNERSYNC_`` variables are checked against the settings (tests/e2e/test_runbooks.py);
- a command line (a ``bash``, ``sh`` or ``powershell`` block), each of whose simple commands gets exactly one
  ``Kind`` from :func:`kind_of`. Each kind names the test that exercises it; the kinds in ``NOT_RUN`` say why
  those lines do not run here. A line with a command that no rule knows fails
  ``test_every_runbook_command_line_is_exercised_or_says_why_not``, so a new tool cannot slip in unexercised
  (decision 73 in docs/decisions.md).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = sorted((ROOT / "runbooks").glob("*.md"))
SHELLS = ("bash", "sh")
COMMAND_LANGUAGES = (*SHELLS, "powershell")


@dataclass(frozen=True)
class Line:
    where: str  # runbooks/x.md:LINE
    language: str  # the fence's language ("" for none)
    text: str  # the logical line (a trailing backslash joined)

    @property
    def runbook(self) -> str:
        return self.where.split(":")[0].removeprefix("runbooks/")


def fenced_lines(text: str) -> list[tuple[int, str]]:
    """(line number, logical line) inside fenced code blocks; a trailing backslash joins the next line."""
    return [(number, line) for number, _language, line in fenced_lines_with_language(text)]


def fenced_lines_with_language(text: str) -> list[tuple[int, str, str]]:
    """(line number, fence language, logical line) inside fenced code blocks."""
    lines: list[tuple[int, str, str]] = []
    language: str | None = None
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        if raw.lstrip().startswith("```"):
            language, pending = (raw.strip()[3:].strip() if language is None else None), ""
            continue
        if language is None:
            continue
        if not pending:
            start = number
        if raw.rstrip().endswith("\\") and language != "powershell":
            pending += raw.rstrip()[:-1] + " "
            continue
        lines.append((start, language, pending + raw))
        pending = ""
    return lines


def runbook_lines() -> list[Line]:
    """Every non-blank line of every runbook's code blocks that is not only a comment."""
    found = []
    for path in RUNBOOKS:
        for number, language, text in fenced_lines_with_language(path.read_text()):
            if text.strip() and not text.strip().startswith("#"):
                found.append(Line(f"runbooks/{path.name}:{number}", language, text))
    return found


def simple_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line (split at ``;``, ``&&``, ``||``, ``|``, ``&``), redirections dropped."""
    line = re.sub(r"(?<!\S)\d*>&\d+(?!\S)", " ", line)  # 2>&1 is one redirection, not a `&` between commands
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in (";", "&&", "||", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [without_redirections(c) for c in commands if c]


def without_redirections(words: list[str]) -> list[str]:
    """The words of a command without its redirections (``> file``, ``2>&1``, ``</dev/null``): the shell's, not ours."""
    kept: list[str] = []
    skip_next = False
    for word in words:
        if skip_next:
            skip_next = False
        elif re.fullmatch(r"<[^<>\s]+>", word):  # a placeholder such as <message-id>, not a redirection
            kept.append(word)
        elif re.fullmatch(r"\d*(>>?|<)", word):
            skip_next = True  # the file name follows
        elif not re.fullmatch(r"\d*(>>?|<)\S+", word):
            kept.append(word)
    return kept


# --- how each command is exercised --------------------------------------------------------------------------------

# kind -> the test that exercises it
EXERCISED = {
    "plannersync": "parsed by the real parser; the read-only ones run (tests/e2e/test_runbooks.py)",
    "files": "run on temporary copies, the host's paths moved (tests/e2e/test_runbooks.py)",
    "postgres": "pg_dump and pg_restore run against a throwaway database (tests/e2e/test_runbooks.py)",
    "broker": "run against the local RabbitMQ in a vhost and users of the test's own (tests/e2e/test_runbook_tools.py)",
    "cluster": "run against two throwaway RabbitMQ nodes of the test's own (tests/e2e/test_runbook_tools.py)",
    "network": "run against local stand-ins: the simulators over TLS and the local broker (tests/e2e/test_runbook_tools.py)",
    "graph-certificate": "run in a temporary directory; plannersync config check loads the result (tests/e2e/test_runbook_tools.py)",
    "secret-files": "run in a temporary directory (the host's paths moved), the secret on standard input; the file's "
    "content and mode checked (tests/e2e/test_runbook_tools.py)",
    "compose-or-systemd": "names checked against compose.yaml and deploy/systemd (tests/e2e/test_runbooks.py)",
    "powershell": "parsed (tree-sitter-powershell); cmdlets and parameters checked against Microsoft's documentation (tests/unit/test_runbook_windows_lines.py)",
    "sqlcmd": "options checked against Microsoft's sqlcmd documentation, the T-SQL against the BACKUP grammar (tests/unit/test_runbook_windows_lines.py)",
}
# kind -> why its lines do not run here
NOT_RUN = {
    "host-setup": "changes the host itself (a system user, /etc, /opt, /usr/local/bin, ownership by the plannersync "
    "user, the git checkout); the same steps are what ./dev (venv, pip install) and the Dockerfile do",
    "inside-container": "runs inside a compose container (docker compose exec/cp); the service's name is checked",
}

NETWORK_RUNBOOK = "network.md"
CERTIFICATE_STEPS_RUNBOOK = "graph.md"
FILE_RUNBOOKS = ("backup.md", "upgrade.md", "certificate.md")
FILE_TOOLS = ("sqlite3", "openssl", "find", "install -d")  # what runs on temporary copies in FILE_RUNBOOKS


def _command_words(argv: list[str]) -> list[str]:
    words = list(argv)
    while words and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]) or words[0] in ("sudo", "env", "-E", "do")):
        words = words[3:] if words[0] == "sudo" and len(words) > 2 and words[1] == "-u" else words[1:]
    return words


def kind_of(line: Line, argv: list[str]) -> str | None:
    """How one simple command of a runbook line is exercised (a key of EXERCISED or NOT_RUN), or None: unknown."""
    if line.language == "powershell":
        return "powershell"
    words = _command_words(argv)
    if not words:
        return "plannersync"  # only assignments (PLANNERSYNC_...=...): checked as settings
    first, text = Path(words[0]).name, " ".join(words)
    if first == "plannersync":
        return "plannersync"
    if words[:4] == ["docker", "compose", "exec", "rabbitmq"] and words[4:5] in (["rabbitmqctl"], ["rabbitmq-queues"]):
        return "broker"
    if first in ("docker", "systemctl", "journalctl"):
        return "inside-container" if words[:3] in (["docker", "compose", "exec"], ["docker", "compose", "cp"]) and "plannersync" not in words else "compose-or-systemd"
    if first in ("rabbitmqctl", "rabbitmq-queues"):
        return "cluster" if line.runbook == "broker.md" else "broker"
    if line.runbook == NETWORK_RUNBOOK and (first in ("curl", "nc") or text.startswith("openssl s_client")):
        return "network"
    if line.runbook == CERTIFICATE_STEPS_RUNBOOK and first in ("openssl", "cat", "chmod", "cp"):
        return "graph-certificate"
    if line.runbook in FILE_RUNBOOKS and line.text.strip().startswith(FILE_TOOLS):
        return "files"
    if first in ("pg_dump", "pg_restore"):
        return "postgres"
    if first == "sqlcmd":
        return "sqlcmd"
    if line.text.strip().startswith("( umask") and "read -rsp" in line.text or text.startswith("openssl rand"):
        return "secret-files"
    if first in ("useradd", "install", "chown", "chgrp", "cp", "ln", "rm", "python3", "pip", "cd", "set", "git") or words[0] == ".":
        return "host-setup"
    return None


def command_lines() -> list[Line]:
    return [line for line in runbook_lines() if line.language in COMMAND_LANGUAGES]


def shell_argvs(line: Line) -> list[list[str]]:
    """The simple commands of a line; a loop's own words (``for w in ...``, ``done``) are the shell's, not commands."""
    if line.language == "powershell":
        return [["<powershell>"]]
    return [argv for argv in simple_commands(line.text.split(" #")[0]) if argv[0] not in ("for", "done")]


def lines_of(kind: str) -> list[Line]:
    """The command lines with at least one simple command of ``kind``."""
    return [line for line in command_lines() if any(kind_of(line, argv) == kind for argv in shell_argvs(line))]
