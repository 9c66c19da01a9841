"""`hub-onboard demo`: the whole story on one machine, with no AWS account.

Starts iot-core-local in a temporary folder and tells the managed integrations story through boto3's
`iot-managed-integrations` client: the custom endpoint, a provisioning profile and the hub's managed thing
(PRE_ASSOCIATED); the hub onboards through the real MQTT path; its managed thing is ACTIVATED and, once
the hub connects as it, connected; offboarding deletes the managed thing (the cloud closes the hub's
connection) and resets the hub. `plain_iot` tells the plain AWS IoT story instead: a provisioning
template, policies and a claim certificate (`recipes.claims`), with the takeover guard (the recipe's
default, hosted by iot-core-local) as its pre-provisioning hook, which refuses a second hub sending the
same serial. `pkcs11` keeps the hub's claim and permanent keys in a SoftHSM2 token (`tools.softhsm`)
instead of files, in either story.

The folder is deleted at exit, unless `keep` names one to keep it in: the hub's config and credentials
(`hub/`) and the stand-in's data (`cloud/`, which `iot-core-local serve --data-dir` serves again) stay
there to look at, and the hub stays onboarded (offboarding is printed as the commands to run).

Without the [server] extra it prints one line naming it and exits 3, before it starts or writes anything.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hub_onboarding.errors import EXIT_USAGE
from hub_onboarding.tools import softhsm

if TYPE_CHECKING:
    from hub_onboarding.config import Pkcs11Config
    from hub_onboarding.onboarding import StepEvent
    from iot_core_local.server import LocalIotCore

SERIAL = "SN-DEMO-0001"
UPC = "012345678905"
PROFILE_NAME = "DemoHubProfile"
TEMPLATE_NAME = "DemoHubTemplate"
OFFBOARD_TIMEOUT = 10.0  # the stand-in closes a deleted hub's connection within 5 s


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _show(text: str) -> None:
    print(f"    {text}", flush=True)


def _hub_progress(event: StepEvent) -> None:
    if event.is_progress:
        _show(f"hub: {event.message}")


def _kept_folder(keep: Path) -> str | None:
    """Why `keep` cannot hold the demo (it must be new or empty: nothing of the user's is overwritten)."""
    if keep.exists() and not keep.is_dir():
        return f"{keep} exists and is not a folder"
    if keep.is_dir() and any(keep.iterdir()):
        return f"{keep} is not empty; name a new or empty folder"
    return None


@dataclass(frozen=True)
class _Stage:
    """Where the demo runs: the stand-in, the folder, whether it is kept, the hub's token (if any)."""

    core: LocalIotCore
    root: Path
    kept: bool
    token: Pkcs11Config | None = None
    env: str = ""  # what commands printed for later need before them (SOFTHSM2_CONF=... with a token)

    def write_hub(
        self, claim_certificate_pem: str, claim_private_key_pem: str, template_name: str, *, name: str = "hub"
    ) -> Path:
        """A factory-fresh hub in `root/name` with serial SERIAL: its config's path."""
        from hub_onboarding.tools.factory import write_claim_hub

        return write_claim_hub(
            self.root / name,
            endpoint_url=self.core.endpoint.mqtt_address,
            root_ca_path=self.core.endpoint.root_ca_path,
            claim_certificate_pem=claim_certificate_pem,
            claim_private_key_pem=claim_private_key_pem,
            template_name=template_name,
            serial=SERIAL,
            upc=UPC,
            token=self.token,
        )

    def show_token_key(self, config_path: Path) -> None:
        """Where the permanent key is, when the hub has a token: an object in it, never extractable."""
        if self.token is None:
            return
        from hub_onboarding.pkcs11 import Pkcs11CredentialStore, TokenUri

        uri = json.loads(config_path.read_text(encoding="utf-8"))["rw"]["iot_permanent_pk_path"]
        described = Pkcs11CredentialStore(self.token).describe_key(TokenUri.parse(uri).label)
        _step("the permanent key lives in the token")
        _show(
            f"{uri}: {described['count']} object, sensitive {described['sensitive'][0]}, "
            f"extractable {described['extractable'][0]}"
        )
        keys = [
            p.name for p in config_path.parent.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()
        ]
        _show(f"private key files beside the config: {len(keys)}")


def run_demo(keep: Path | None = None, *, plain_iot: bool = False, pkcs11: bool = False) -> int:
    """Run the demo; `keep`: a new or empty folder to leave the hub's and the stand-in's files in;
    `plain_iot`: the plain AWS IoT story instead of managed integrations'; `pkcs11`: the hub's keys live
    in a SoftHSM2 token (tools.softhsm) instead of files."""
    from iot_core_local.extra import EXIT_MISSING_EXTRA, missing_server_extra

    problem = missing_server_extra("hub-onboard demo")
    if problem is None and pkcs11:
        from hub_onboarding.tools.softhsm import missing_softhsm

        if (missing := missing_softhsm()) is not None:
            problem = f"hub-onboard demo --pkcs11: {missing}"
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_MISSING_EXTRA
    if keep is not None and (why := _kept_folder(keep)) is not None:
        print(f"hub-onboard demo: --keep: {why}", file=sys.stderr)
        return EXIT_USAGE
    from iot_core_local.server import LocalIotCore

    story: Callable[[_Stage], bool] = _plain_iot_story if plain_iot else _managed_integrations_story
    with contextlib.ExitStack() as stack:
        if keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hub-onboard-demo-")))
        else:
            keep.mkdir(parents=True, exist_ok=True)
            root = keep.resolve()
        _step("starting iot-core-local (gateway, Mosquitto, control plane)")
        with LocalIotCore(root / "cloud") as core:
            ports = (core.endpoint.mqtt_port, int(core.endpoint.api_url.rsplit(":", 1)[1]))
            _show(f"MQTT   mqtts://{core.endpoint.mqtt_address}")
            _show(f"API    {core.endpoint.api_url}")
            softhsm_token = _demo_token(root) if pkcs11 else None
            token = softhsm_token.config() if softhsm_token is not None else None
            # Commands printed for later runs carry the token's SoftHSM2 config: from a new shell, SoftHSM2
            # finds no token without it (its default config names another store).
            env = f"{softhsm.CONF_ENV}={softhsm_token.conf} " if softhsm_token is not None else ""
            ok = story(_Stage(core, root, keep is not None, token, env))
        if keep is not None:
            config_path = root / "hub" / "iotmi_config.json"
            _step(f"kept in {root}")
            _show(f"hub:   {config_path} and its credentials in {config_path.parent}")
            # The kept hub's config names this run's MQTT port: serving the cloud again on the same
            # ports lets it (and the printed offboarding commands) reach it.
            _show(
                f"cloud: {root / 'cloud'} (iot-core-local serve --data-dir {root / 'cloud'} "
                f"--mqtt-port {ports[0]} --api-port {ports[1]})"
            )
            _show(f"{env}hub-onboard status --config {config_path}")
    return 0 if ok else 1


# ---------------------------------------------------------------------------- managed integrations


def _managed_integrations_story(stage: _Stage) -> bool:
    from hub_onboarding.onboarding import HubOnboarding
    from iot_core_local.recipes.managed_integrations import Hub, set_up_managed_integrations

    mi = stage.core.endpoint.client(stage.core.region, service="iot-managed-integrations")
    _step("managed integrations set-up: endpoint, provisioning profile, the hub's managed thing (boto3)")
    setup = set_up_managed_integrations(mi, PROFILE_NAME, [Hub(SERIAL, upc=UPC)])
    for line in setup.steps:
        _show(str(line))
    assert setup.claim_private_key_pem is not None  # a new stand-in: the profile was created just now
    managed_thing_id = setup.hubs[0].managed_thing_id
    _step(f"writing a factory-fresh hub config (SN {SERIAL}, UPC {UPC}, fp_template_name {PROFILE_NAME})")
    config_path = stage.write_hub(
        setup.claim_certificate_pem, setup.claim_private_key_pem, setup.template_name
    )
    _step(
        "onboarding the hub (claim connect, CreateCertificateFromCsr, RegisterThing with SN and UPC, verify)"
    )
    hub = HubOnboarding(config_path, on_step=_hub_progress)
    result = hub.process_device()
    stage.show_token_key(config_path)
    thing = mi.get_managed_thing(Identifier=managed_thing_id)
    _step("the managed thing after onboarding")
    _show(f"{managed_thing_id} {thing['ProvisioningStatus']} since {thing.get('ActivatedAt')}")
    _show(f"rw.client_id {result.client_id}, rw.managed_thing_id {result.managed_thing_id}")
    if result.managed_thing_id != managed_thing_id:
        _show("the hub's managed_thing_id is not the one CreateManagedThing returned")
        return False
    if stage.kept:
        _offboarding_commands(stage, managed_thing_id, config_path)
        return result.state == "PROVISIONED"
    with _hub_connection(config_path, stage.token) as lost:
        data = mi.get_managed_thing_connectivity_data(Identifier=managed_thing_id)
        _step(f"the hub connects as {result.client_id}")
        _show(f"GetManagedThingConnectivityData: Connected {data['Connected']}")
        _step("offboarding: DeleteManagedThing while the hub is connected")
        mi.delete_managed_thing(Identifier=managed_thing_id)
        closed = lost.wait(OFFBOARD_TIMEOUT)
        _show("the cloud closed the hub's connection" if closed else "the hub's connection is still open")
    gone = _wait_gone(mi, managed_thing_id)
    _show(f"GetManagedThing: {'ResourceNotFoundException' if gone else 'still there'}")
    deleted = HubOnboarding(config_path).reset()
    state = json.loads(config_path.read_text(encoding="utf-8"))["rw"]["iot_provisioning_state"]
    _show(f"hub-onboard reset: {state}, {len(deleted)} files of onboarding deleted")
    return result.state == "PROVISIONED" and thing["ProvisioningStatus"] == "ACTIVATED" and closed and gone


@contextlib.contextmanager
def _hub_connection(config_path: Path, token: Pkcs11Config | None = None) -> Iterator[threading.Event]:
    """The hub's own connection with its permanent identity, as its runtime keeps one; yields the event
    set when the cloud closes it."""
    from hub_onboarding import config as cfgmod
    from hub_onboarding.certs import CertHandler, CertType
    from hub_onboarding.mqtt import ConnectionSettings, IotProvisioning

    doc = cfgmod.read_document(config_path)
    cfg = cfgmod.parse_config(config_path, doc, warn=False)
    rw = doc[cfgmod.RW]
    handler = CertHandler()
    if token is not None:  # the permanent key is an object in the hub's token
        from hub_onboarding.pkcs11 import Pkcs11CredentialStore

        handler = CertHandler(token_store=Pkcs11CredentialStore(token))
    credentials = handler.read_cert_and_private_key(
        CertType.PERMANENT, rw[cfgmod.PERMANENT_CERT_PATH], rw[cfgmod.PERMANENT_PK_PATH]
    )
    settings = ConnectionSettings(
        cfg.connection.endpoint, cfg.connection.root_ca_path, cfg.connection.keep_alive
    )
    with IotProvisioning(settings).connect(rw[cfgmod.CLIENT_ID], credentials) as connection:
        yield connection.lost


def _wait_gone(mi: Any, managed_thing_id: str) -> bool:
    """Whether GetManagedThing says ResourceNotFoundException within OFFBOARD_TIMEOUT (the thing is
    DELETE_IN_PROGRESS until the cloud has seen the hub's connection close)."""
    deadline = time.monotonic() + OFFBOARD_TIMEOUT
    tick = threading.Event()
    while True:
        try:
            mi.get_managed_thing(Identifier=managed_thing_id)
        except mi.exceptions.ResourceNotFoundException:
            return True
        if time.monotonic() >= deadline:
            return False
        tick.wait(0.1)  # asked ten times a second: the control plane has no change notification


def _offboarding_commands(stage: _Stage, managed_thing_id: str, config_path: Path) -> None:
    _step("offboarding, when you want it (serve the kept cloud first)")
    cloud = stage.root / "cloud"
    # The AWS CLI needs a region and credentials even on loopback: the ones serve writes into its data dir.
    _show(
        f"AWS_SHARED_CREDENTIALS_FILE={cloud / 'credentials'} AWS_DEFAULT_REGION=us-east-1 "
        f"aws iot-managed-integrations delete-managed-thing --identifier {managed_thing_id} "
        f"--endpoint-url <apiUrl of iot-core-local serve --data-dir {cloud}>"
    )
    _show(f"{stage.env}hub-onboard reset --config {config_path} --yes")


# ---------------------------------------------------------------------------------------- plain IoT


def _plain_iot_story(stage: _Stage) -> bool:
    from hub_onboarding.errors import IdentityError
    from hub_onboarding.onboarding import HubOnboarding
    from iot_core_local.recipes.claims import set_up_fleet_provisioning

    iot = stage.core.client()
    # The recipe's template names the takeover guard (the HubTakeoverGuard Lambda function in AWS), which
    # iot-core-local hosts itself: nothing to run beside it, and the kept cloud stays guarded.
    _step("creating the provisioning template (the takeover guard as its hook), policies, claim (boto3)")
    claim = set_up_fleet_provisioning(iot, TEMPLATE_NAME)
    _show(f"claim certificate {claim.certificate_id[:16]}... attached to {claim.claim_policy_name}")
    _step("writing a factory-fresh hub config")
    config_path = stage.write_hub(claim.certificate_pem, claim.private_key_pem, claim.template_name)
    hub = HubOnboarding(config_path, on_step=_hub_progress)
    _show(f"{config_path}: provisioned = {hub.is_provisioned()}")
    _step("onboarding the hub (claim connect, CreateCertificateFromCsr, RegisterThing, verify)")
    hub.process_device()
    stage.show_token_key(config_path)
    _step(f"a second hub sending serial {SERIAL} with the same claim")
    intruder = stage.write_hub(
        claim.certificate_pem, claim.private_key_pem, claim.template_name, name="intruder"
    )
    try:
        HubOnboarding(intruder).process_device()
    except IdentityError as exc:
        _show(f"refused by the takeover guard (statusCode {exc.status_code})")
    else:
        _show("onboarded: the takeover guard let it through")
        return False
    _step("the cloud now has")
    for thing in iot.list_things()["things"]:
        principals = iot.list_thing_principals(thingName=thing["thingName"])["principals"]
        _show(f"thing {thing['thingName']} attributes {thing.get('attributes', {})}")
        for arn in principals:
            cert_id = arn.rsplit("/", 1)[1]
            status = iot.describe_certificate(certificateId=cert_id)["certificateDescription"]["status"]
            _show(f"  certificate {cert_id[:16]}... {status}")
    _step("running onboarding again (a reboot): nothing to do")
    _show(f"provisioned = {HubOnboarding(config_path).is_provisioned()}")
    _step(f"resulting {config_path.name}")
    print(config_path.read_text(encoding="utf-8"))
    state = json.loads(config_path.read_text(encoding="utf-8"))["rw"]["iot_provisioning_state"]
    return bool(state == "PROVISIONED")


def _demo_token(root: Path) -> softhsm.SoftHsmToken:
    """A SoftHSM2 token in the demo's folder, which the factory gives the claim key (--pkcs11)."""

    _step("initialising a SoftHSM2 token 'hub' (the hub's secure element, PKCS#11)")
    token = softhsm.make_token(root / "softhsm")
    softhsm.activate(token)
    _show(f"module {token.module_path}")
    _show(f"user PIN in {token.pin_path} (0600); the claim key goes into the token, not into a file")
    return token


if __name__ == "__main__":
    sys.exit(run_demo())
