"""The provisioning MQTT API's topics and the values requests and answers travel in (pure).

    $aws/certificates/create/{fmt}                            CreateKeysAndCertificate
    $aws/certificates/create-from-csr/{fmt}                   CreateCertificateFromCsr
    $aws/provisioning-templates/{name}/provision/{fmt}        RegisterThing
    $aws/events/certificates/registered/{caCertificateId}     the JITR registration event

`{fmt}` is json or cbor, and the answer uses the same. Each request is answered on
`<request topic>/accepted` or `<request topic>/rejected`.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "CREATE_FROM_CSR",
    "CREATE_KEYS",
    "FORMATS",
    "REGISTER_THING",
    "Answer",
    "Request",
    "Requester",
    "is_provisioning_filter",
    "parse_request_topic",
    "registration_event_topic",
]

CREATE_KEYS = "CreateKeysAndCertificate"
CREATE_FROM_CSR = "CreateCertificateFromCsr"
REGISTER_THING = "RegisterThing"
FORMATS = ("json", "cbor")

_CREATE_PREFIX = "$aws/certificates/create/"
_CSR_PREFIX = "$aws/certificates/create-from-csr/"
_TEMPLATES_PREFIX = "$aws/provisioning-templates/"
# Subscriptions under these prefixes can only ever see provisioning answers, which never pass through
# Mosquitto; the gateway keeps them to itself.
_ANSWER_ONLY_PREFIXES = (_CREATE_PREFIX, _CSR_PREFIX, _TEMPLATES_PREFIX)


@dataclass(frozen=True)
class Request:
    """A request topic, understood."""

    operation: str
    topic: str
    payload_format: str
    template_name: str | None = None


@dataclass(frozen=True)
class Requester:
    """Who asks: the claim certificate of the connection, and its MQTT client id."""

    claim_certificate_id: str
    client_id: str


@dataclass(frozen=True)
class Answer:
    """What to publish back on the asking connection, and a loggable summary (no secrets)."""

    operation: str
    topic: str
    payload: bytes
    accepted: bool
    summary: str


def parse_request_topic(topic: str) -> Request | None:
    """The provisioning request a topic names, or None if it names none (then it is just a topic)."""
    if topic.startswith(_CREATE_PREFIX):
        fmt, operation = topic[len(_CREATE_PREFIX) :], CREATE_KEYS
    elif topic.startswith(_CSR_PREFIX):
        fmt, operation = topic[len(_CSR_PREFIX) :], CREATE_FROM_CSR
    elif topic.startswith(_TEMPLATES_PREFIX):
        name, sep, rest = topic[len(_TEMPLATES_PREFIX) :].partition("/provision/")
        if not sep or not name or "/" in name or rest not in FORMATS:
            return None
        return Request(REGISTER_THING, topic, rest, name)
    else:
        return None
    return Request(operation, topic, fmt) if fmt in FORMATS else None


def is_provisioning_filter(topic_filter: str) -> bool:
    """True if a subscription can only match provisioning topics (so Mosquitto need not see it)."""
    return topic_filter.startswith(_ANSWER_ONLY_PREFIXES)


def registration_event_topic(ca_certificate_id: str) -> str:
    return f"$aws/events/certificates/registered/{ca_certificate_id}"
