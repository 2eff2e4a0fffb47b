"""The runbooks' PowerShell and sqlcmd lines, checked without Exchange, PowerShell or SQL Server (decision 73).

They cannot run here: PowerShell 7 is not in Debian or PyPI (npm's ``pwsh`` downloads it from GitHub at install
time), the Exchange cmdlets exist only in the Exchange Management Shell or Exchange Online, and neither Microsoft's
``sqlcmd`` nor a SQL Server is to be had. So each PowerShell line is parsed with tree-sitter's PowerShell grammar,
and every cmdlet and parameter it uses must be in ``CMDLETS``: the syntax of each cmdlet as Microsoft's reference
documents it (the URL beside it), with its parameter sets, so a misspelt or mismatched parameter fails. Each sqlcmd
line's options must be in ``SQLCMD_OPTIONS`` (Microsoft's sqlcmd reference), and its ``-Q`` query must match the
``BACKUP DATABASE`` grammar of Microsoft's BACKUP reference, kept below (the T-SQL parsers to be had here, sqlglot's
and sqlfluff's tsql dialects, do not know BACKUP).
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Node, Parser

from tests.support.runbooks import Line, lines_of

COMMON = {"Debug", "ErrorAction", "ErrorVariable", "InformationAction", "InformationVariable", "OutVariable", "OutBuffer", "PipelineVariable", "Verbose", "WarningAction", "WarningVariable"}
COMMON_SWITCHES = {"Debug", "Verbose"}


@dataclass(frozen=True)
class Cmdlet:
    url: str
    positional: tuple[str, ...]  # parameters that may be given by position, in order
    sets: tuple[frozenset[str], ...]  # each parameter set: the parameters that can go together
    switches: frozenset[str] = field(default_factory=frozenset)  # parameters that take no value


def _set(*names: str) -> frozenset[str]:
    return frozenset(names)


EXO = "https://learn.microsoft.com/powershell/module/exchangepowershell/"
_ROLE_SCOPES = ("CustomConfigWriteScope", "CustomRecipientWriteScope", "DomainController", "ExclusiveConfigWriteScope", "ExclusiveRecipientWriteScope",
                "RecipientAdministrativeUnitScope", "RecipientGroupScope", "RecipientOrganizationalUnitScope", "RecipientRelativeWriteScope")
_ROLE_SWITCHES = ("Confirm", "Force", "WhatIf", "Delegating", "UnScopedTopLevel")
CMDLETS: dict[str, Cmdlet] = {
    "New-DistributionGroup": Cmdlet(EXO + "new-distributiongroup", ("Name",), (_set(
        "Name", "Alias", "ArbitrationMailbox", "BccBlocked", "BypassNestedModerationEnabled", "Confirm", "CopyOwnerToMember", "Description", "DisplayName",
        "DomainController", "HiddenGroupMembershipEnabled", "IgnoreNamingPolicy", "ManagedBy", "MemberDepartRestriction", "MemberJoinRestriction", "Members",
        "ModeratedBy", "ModerationEnabled", "Notes", "OrganizationalUnit", "PrimarySmtpAddress", "RequireSenderAuthenticationEnabled", "RoomList",
        "SamAccountName", "SendModerationNotifications", "Type", "WhatIf"),),
        _set("Confirm", "CopyOwnerToMember", "HiddenGroupMembershipEnabled", "IgnoreNamingPolicy", "RoomList", "WhatIf")),
    "Add-DistributionGroupMember": Cmdlet(EXO + "add-distributiongroupmember", ("Identity",),
        (_set("Identity", "BypassSecurityGroupManagerCheck", "Confirm", "DomainController", "Member", "WhatIf"),), _set("BypassSecurityGroupManagerCheck", "Confirm", "WhatIf")),
    "Get-DistributionGroup": Cmdlet(EXO + "get-distributiongroup", ("Identity",), (
        _set("Identity", "Credential", "DomainController", "IgnoreDefaultScope", "ManagedBy", "OrganizationalUnit", "ReadFromDomainController", "RecipientTypeDetails", "ResultSize", "SortBy"),
        _set("Anr", "Credential", "DomainController", "IgnoreDefaultScope", "ManagedBy", "OrganizationalUnit", "ReadFromDomainController", "RecipientTypeDetails", "ResultSize", "SortBy"),
        _set("Filter", "Credential", "DomainController", "IgnoreDefaultScope", "ManagedBy", "OrganizationalUnit", "ReadFromDomainController", "RecipientTypeDetails", "ResultSize", "SortBy")),
        _set("IgnoreDefaultScope", "ReadFromDomainController")),
    "New-ManagementScope": Cmdlet(EXO + "new-managementscope", ("Name",), tuple(
        _set("Name", what, "Confirm", "DomainController", "Exclusive", "Force", "WhatIf", *(("RecipientRoot",) if what == "RecipientRestrictionFilter" else ()))
        for what in ("DatabaseList", "DatabaseRestrictionFilter", "RecipientRestrictionFilter", "ServerList", "ServerRestrictionFilter")),
        _set("Confirm", "Exclusive", "Force", "WhatIf")),
    "New-ManagementRoleAssignment": Cmdlet(EXO + "new-managementroleassignment", ("Name",), (
        _set("Name", "Role", "App", "CustomResourceScope", "Confirm", "Delegating", "Force", "RecipientAdministrativeUnitScope", "RecipientGroupScope", "WhatIf"),
        *(_set("Name", "Role", who, *_ROLE_SCOPES, *_ROLE_SWITCHES) for who in ("Computer", "Policy", "SecurityGroup", "User"))),
        _set(*_ROLE_SWITCHES)),
    "New-ServicePrincipal": Cmdlet(EXO + "new-serviceprincipal", (), (_set("AppId", "ObjectId", "ServiceId", "Confirm", "DisplayName", "Organization", "WhatIf"),), _set("Confirm", "WhatIf")),
    "Test-ServicePrincipalAuthorization": Cmdlet(EXO + "test-serviceprincipalauthorization", ("Identity",), (_set("Identity", "Confirm", "Resource", "WhatIf"),), _set("Confirm", "WhatIf")),
}
AUTOMATIC_VARIABLES = {"_", "true", "false", "null", "PSItem"}

PARSER = Parser(Language(tree_sitter_powershell.language()))


def _commands(node: Node) -> list[Node]:
    found = [node] if node.type == "command" else []
    for child in node.children:
        found += _commands(child)
    return found


def _text(node: Node) -> str:
    return (node.text or b"").decode()


def powershell_problems(where: str, source: str, assigned: set[str]) -> list[str]:
    """What is wrong with one line of PowerShell: a syntax error, an unknown cmdlet or parameter, parameters from
    different parameter sets, too many positional arguments, or a variable no earlier line assigned."""
    tree = PARSER.parse(source.encode())
    if tree.root_node.has_error:
        return [f"{where}: {source!r} does not parse as PowerShell"]
    problems = []
    for command in _commands(tree.root_node):
        name_node = command.child_by_field_name("command_name") or next((c for c in command.children if c.type == "command_name"), None)
        name = _text(name_node) if name_node is not None else ""
        cmdlet = CMDLETS.get(name)
        if cmdlet is None:
            problems.append(f"{where}: {name!r} is not a cmdlet of CMDLETS (add it with the syntax of its Microsoft reference page)")
            continue
        elements = [c for c in next((c for c in command.children if c.type == "command_elements"), command).children if c.type != "command_argument_sep"]
        given: list[str] = []
        positional = 0
        i = 0
        while i < len(elements):
            element = elements[i]
            if element.type == "command_parameter":
                parameter = _text(element).lstrip("-").split(":")[0]
                known = {p.lower(): p for s in cmdlet.sets for p in s} | {p.lower(): p for p in COMMON}
                if parameter.lower() not in known:
                    problems.append(f"{where}: {name} has no parameter -{parameter} ({cmdlet.url})")
                else:
                    given.append(known[parameter.lower()])
                    takes_value = known[parameter.lower()] not in cmdlet.switches | COMMON_SWITCHES and ":" not in _text(element)
                    i += 1 if takes_value else 0
            else:
                positional += 1
            i += 1
        open_positions = [p for p in cmdlet.positional if p not in given]  # a parameter given by name takes no position
        if positional > len(open_positions):
            problems.append(f"{where}: {name} has {len(open_positions)} positional parameter(s) left, given {positional} positional argument(s) ({cmdlet.url})")
        given += open_positions[:positional]
        if given and not any(set(given) - COMMON <= s for s in cmdlet.sets):
            problems.append(f"{where}: {name} parameters {sorted(set(given))} are not one of its parameter sets ({cmdlet.url})")
    for variable in re.findall(r"\$(\w+)", re.sub(r"^\s*\$\w+\s*=", "", source)):  # uses, not the assignment's own name
        if variable not in assigned | AUTOMATIC_VARIABLES:
            problems.append(f"{where}: ${variable} is used before any line of the block assigns it")
    assigned.update(re.findall(r"^\s*\$(\w+)\s*=", source))
    return problems


def powershell_lines() -> list[Line]:
    return lines_of("powershell")


def block_problems(lines: list[Line]) -> list[str]:
    problems: list[str] = []
    assigned: dict[str, set[str]] = {}
    for line in lines:
        problems += powershell_problems(line.where, line.text, assigned.setdefault(line.runbook, set()))
    return problems


def test_every_powershell_line_parses_and_uses_documented_cmdlets_and_parameters() -> None:
    lines = powershell_lines()
    assert len(lines) >= 10 and {line.runbook for line in lines} == {"exchange.md", "graph.md"}, lines
    problems = block_problems(lines)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('New-ManagementRoleAssignment -App 0f9e -Role "Application Calendars.Read" -CustomRecipientWriteScope "x"', "not one of its parameter sets"),
        ('New-ManagementScope -Name "x" -RecipientFilter "MemberOfGroup -eq \'y\'"', "has no parameter -RecipientFilter"),
        ("Add-DistributionGroupMembers -Identity x -Member y", "is not a cmdlet of CMDLETS"),
        ('New-DistributionGroup -Name "x" -Type Security "extra"', "given 1 positional argument(s)"),
        ('New-ManagementScope -Name "x" -RecipientRestrictionFilter "MemberOfGroup -eq \'$groupdn\'"', "$groupdn is used before"),
        ('New-DistributionGroup -Name "x -Type Security', "does not parse as PowerShell"),
    ],
)
def test_a_powershell_mistake_is_caught(source: str, expected: str) -> None:
    assert any(expected in problem for problem in powershell_problems("x", source, set())), powershell_problems("x", source, set())


# --- sqlcmd --------------------------------------------------------------------------------------------------------

SQLCMD_URL = "https://learn.microsoft.com/sql/tools/sqlcmd/sqlcmd-utility"
# option -> takes a value (the options of Microsoft's sqlcmd an operator uses for a backup; the reference has more)
SQLCMD_OPTIONS = {"-S": True, "-d": True, "-E": False, "-U": True, "-P": True, "-G": False, "-Q": True, "-q": True, "-i": True, "-o": True,
                  "-b": False, "-C": False, "-N": True, "-l": True, "-t": True, "-V": True}
BACKUP_URL = "https://learn.microsoft.com/sql/t-sql/statements/backup-transact-sql"
# BACKUP DATABASE { database_name } TO DISK = 'physical_device_name' [ WITH option [ ,...n ] ] (the reference's grammar,
# for one disk device); option -> takes a value
BACKUP_OPTIONS = {"COPY_ONLY": False, "CHECKSUM": False, "NO_CHECKSUM": False, "COMPRESSION": False, "NO_COMPRESSION": False, "INIT": False,
                  "NOINIT": False, "FORMAT": False, "NOFORMAT": False, "SKIP": False, "NOSKIP": False, "STOP_ON_ERROR": False,
                  "CONTINUE_AFTER_ERROR": False, "DIFFERENTIAL": False, "STATS": None, "NAME": True, "DESCRIPTION": True, "RETAINDAYS": True}
BACKUP = re.compile(r"BACKUP\s+DATABASE\s+(?P<database>\[[^\]]+\]|[A-Za-z_][\w@$#]*)\s+TO\s+DISK\s*=\s*N?'(?P<device>[^']+)'(?:\s+WITH\s+(?P<options>.+?))?\s*;?", re.I | re.S)


def tsql_problems(where: str, query: str) -> list[str]:
    match = BACKUP.fullmatch(query.strip())
    if match is None:
        return [f"{where}: {query!r} is not BACKUP DATABASE name TO DISK = N'file' [WITH ...] ({BACKUP_URL})"]
    problems = []
    for option in [o.strip() for o in (match.group("options") or "").split(",") if o.strip()]:
        name, _, value = (part.strip() for part in option.partition("="))
        takes = BACKUP_OPTIONS.get(name.upper(), "unknown")
        if takes == "unknown" or (takes is True and not value) or (takes is False and value):
            problems.append(f"{where}: BACKUP option {option!r} is not in the reference's grammar ({BACKUP_URL})")
    return problems


def sqlcmd_problems(where: str, argv: list[str]) -> list[str]:
    problems, queries, i = [], [], 1
    while i < len(argv):
        option = argv[i]
        if option not in SQLCMD_OPTIONS:
            problems.append(f"{where}: sqlcmd has no option {option} we know ({SQLCMD_URL})")
            i += 1
            continue
        if SQLCMD_OPTIONS[option]:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                problems.append(f"{where}: sqlcmd {option} needs a value")
            elif option in ("-Q", "-q"):
                queries.append(argv[i + 1])
            i += 1
        i += 1
    if "-S" not in argv or not queries:
        problems.append(f"{where}: a runbook's sqlcmd names its server (-S) and its query (-Q)")
    return problems + [p for q in queries for p in tsql_problems(where, q)]


def test_every_sqlcmd_line_uses_documented_options_and_a_backup_statement_of_the_reference_grammar() -> None:
    lines = lines_of("sqlcmd")
    assert len(lines) >= 1, lines
    argvs = [shlex.split(line.text, comments=True) for line in lines]
    problems = [p for line, argv in zip(lines, argvs) for p in sqlcmd_problems(line.where, argv)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("""sqlcmd -S sql01 -d master -Q "BACKUP DATABASE plannersync TO DISK = N'D:\\b.bak' WITH COPY_ONLY, CHECKSUMS" """, "option 'CHECKSUMS'"),
        ("""sqlcmd -S sql01 -Q "BACKUP DATABSE plannersync TO DISK = N'D:\\b.bak'" """, "is not BACKUP DATABASE"),
        ("""sqlcmd -S sql01 --database master -Q "BACKUP DATABASE x TO DISK = N'y'" """, "no option --database"),
        ("""sqlcmd -d master -Q "BACKUP DATABASE x TO DISK = N'y' WITH STATS = 10, NAME = N'before upgrade'" """, "names its server"),
    ],
)
def test_a_sqlcmd_mistake_is_caught(line: str, expected: str) -> None:
    problems = sqlcmd_problems("x", shlex.split(line))
    assert any(expected in problem for problem in problems), problems
