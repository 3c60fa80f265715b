"""twistd plugin stub: ``twistd mailgate`` runs :mod:`mailgate.tap`."""

from twisted.application.service import ServiceMaker

Mailgate = ServiceMaker(
    "mailgate",
    "mailgate.tap",
    "SMTP front door for transactional email APIs",
    "mailgate",
)
