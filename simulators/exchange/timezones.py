"""Windows time zone ids (what Exchange and Outlook use) to IANA zones, and back.

Exchange names zones the Windows way ("Romance Standard Time"); expansion and DST come from zoneinfo.
The table holds the zones a Danish municipality and its tests meet; unknown ids raise ``UnknownTimeZone``.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

WINDOWS_TO_IANA: dict[str, str] = {
    "Romance Standard Time": "Europe/Copenhagen",
    "W. Europe Standard Time": "Europe/Berlin",
    "Central Europe Standard Time": "Europe/Budapest",
    "Central European Standard Time": "Europe/Warsaw",
    "GMT Standard Time": "Europe/London",
    "Greenwich Standard Time": "Atlantic/Reykjavik",
    "FLE Standard Time": "Europe/Helsinki",
    "GTB Standard Time": "Europe/Bucharest",
    "E. Europe Standard Time": "Europe/Chisinau",
    "Russian Standard Time": "Europe/Moscow",
    "Greenland Standard Time": "America/Godthab",
    "Eastern Standard Time": "America/New_York",
    "Central Standard Time": "America/Chicago",
    "Mountain Standard Time": "America/Denver",
    "Pacific Standard Time": "America/Los_Angeles",
    "Tokyo Standard Time": "Asia/Tokyo",
    "China Standard Time": "Asia/Shanghai",
    "India Standard Time": "Asia/Kolkata",
    "AUS Eastern Standard Time": "Australia/Sydney",
    "UTC": "UTC",
    "Coordinated Universal Time": "UTC",
}

# IANA zones Exchange reports under a Windows id other than their own table entry (Copenhagen is "Romance").
IANA_TO_WINDOWS: dict[str, str] = {iana: win for win, iana in WINDOWS_TO_IANA.items() if win != "Coordinated Universal Time"}
IANA_TO_WINDOWS.update(
    {
        "Europe/Paris": "Romance Standard Time",
        "Europe/Brussels": "Romance Standard Time",
        "Europe/Madrid": "Romance Standard Time",
        "Europe/Amsterdam": "W. Europe Standard Time",
        "Europe/Stockholm": "W. Europe Standard Time",
        "Europe/Oslo": "W. Europe Standard Time",
        "Europe/Rome": "W. Europe Standard Time",
        "Europe/Vienna": "W. Europe Standard Time",
        "Europe/Zurich": "W. Europe Standard Time",
        "Europe/Dublin": "GMT Standard Time",
        "Europe/Lisbon": "GMT Standard Time",
        "America/Nuuk": "Greenland Standard Time",
        "Atlantic/Faroe": "GMT Standard Time",
        "Etc/UTC": "UTC",
        "GMT": "UTC",
    }
)


class UnknownTimeZone(ValueError):
    """A zone name that is neither in the Windows table nor a known IANA zone."""


def windows_id(name: str) -> str:
    """The Windows id for a Windows or IANA zone name."""
    if name in WINDOWS_TO_IANA:
        return name
    if name in IANA_TO_WINDOWS:
        return IANA_TO_WINDOWS[name]
    raise UnknownTimeZone(name)


def zone(name: str) -> ZoneInfo:
    """The zoneinfo zone for a Windows or IANA zone name."""
    iana = WINDOWS_TO_IANA.get(name, name)
    try:
        return ZoneInfo(iana)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise UnknownTimeZone(name) from exc
