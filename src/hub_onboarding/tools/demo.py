"""`hub-onboard demo`: the whole story on one machine, with no AWS account.

Starts iot-core-local in a temporary folder, does what a hub maker does once in the cloud (template,
policies, claim certificate) through the boto3 control plane, writes the config a factory would put on
a hub, and onboards a simulated hub through the real MQTT path. The folder is deleted at exit, unless
`keep` names one to keep it in: the hub's config and credentials (`hub/`) and the stand-in's data
(`cloud/`, which `iot-core-local serve --data-dir` serves again) stay there to look at.

Without the [server] extra it prints one line naming it and exits 3, before it starts or writes anything.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from hub_onboarding.errors import EXIT_USAGE

if TYPE_CHECKING:
    from hub_onboarding.config import Pkcs11Config


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def _kept_folder(keep: Path) -> str | None:
    """Why `keep` cannot hold the demo (it must be new or empty: nothing of the user's is overwritten)."""
    if keep.exists() and not keep.is_dir():
        return f"{keep} exists and is not a folder"
    if keep.is_dir() and any(keep.iterdir()):
        return f"{keep} is not empty; name a new or empty folder"
    return None


def run_demo(keep: Path | None = None, pkcs11: bool = False) -> int:
    """Run the demo; `keep`: a new or empty folder to leave the hub's and the stand-in's files in;
    `pkcs11`: the hub's keys live in a SoftHSM2 token (tools.softhsm) instead of files."""
    from iot_core_local.extra import EXIT_MISSING_EXTRA, missing_server_extra

    problem = missing_server_extra("hub-onboard demo")
    if problem is None and pkcs11:
        from hub_onboarding.tools.softhsm import missing_softhsm

        problem = missing_softhsm()
    if problem is not None:
        print(problem, file=sys.stderr)
        return EXIT_MISSING_EXTRA
    if keep is not None and (why := _kept_folder(keep)) is not None:
        print(f"hub-onboard demo: --keep: {why}", file=sys.stderr)
        return EXIT_USAGE
    from hub_onboarding.onboarding import HubOnboarding, StepEvent
    from hub_onboarding.tools.factory import write_claim_hub
    from iot_core_local.recipes.claims import set_up_fleet_provisioning
    from iot_core_local.server import LocalIotCore

    def show(event: StepEvent) -> None:
        if event.is_progress:
            print(f"    hub: {event.message}", flush=True)

    with contextlib.ExitStack() as stack:
        if keep is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hub-onboard-demo-")))
        else:
            keep.mkdir(parents=True, exist_ok=True)
            root = keep.resolve()
        _step("starting iot-core-local (gateway, Mosquitto, control plane)")
        with LocalIotCore(root / "cloud") as core:
            endpoint = core.endpoint
            print(f"    MQTT   mqtts://{endpoint.mqtt_address}")
            print(f"    API    {endpoint.api_url}")
            _step(
                "creating the provisioning template, hub policy, claim policy and claim certificate (boto3)"
            )
            iot = core.client()
            claim = set_up_fleet_provisioning(iot, "DemoHubTemplate")
            print(
                f"    claim certificate {claim.certificate_id[:16]}... attached to {claim.claim_policy_name}"
            )
            token = _demo_token(root) if pkcs11 else None
            _step("writing a factory-fresh hub config")
            config_path = write_claim_hub(
                root / "hub",
                endpoint_url=endpoint.mqtt_address,
                root_ca_path=endpoint.root_ca_path,
                claim_certificate_pem=claim.certificate_pem,
                claim_private_key_pem=claim.private_key_pem,
                template_name=claim.template_name,
                serial="SN-DEMO-0001",
                token=token,
            )
            hub = HubOnboarding(config_path, on_step=show)
            print(f"    {config_path}: provisioned = {hub.is_provisioned()}")
            _step("onboarding the hub (claim connect, CreateCertificateFromCsr, RegisterThing, verify)")
            hub.process_device()
            _step("the cloud now has")
            for thing in iot.list_things()["things"]:
                principals = iot.list_thing_principals(thingName=thing["thingName"])["principals"]
                print(f"    thing {thing['thingName']} attributes {thing.get('attributes', {})}")
                for arn in principals:
                    cert_id = arn.rsplit("/", 1)[1]
                    described = iot.describe_certificate(certificateId=cert_id)
                    status = described["certificateDescription"]["status"]
                    print(f"      certificate {cert_id[:16]}... {status}")
            if token is not None:
                _show_token_key(config_path, token)
            _step("running onboarding again (a reboot): nothing to do")
            again = HubOnboarding(config_path)
            print(f"    provisioned = {again.is_provisioned()}")
            _step(f"resulting {config_path.name}")
            print(config_path.read_text(encoding="utf-8"))
            state = json.loads(config_path.read_text(encoding="utf-8"))["rw"]["iot_provisioning_state"]
        if keep is not None:
            _step(f"kept in {root}")
            print(f"    hub:   {config_path} and its credentials in {config_path.parent}")
            print(f"    cloud: {root / 'cloud'} (iot-core-local serve --data-dir {root / 'cloud'})")
            print(f"    hub-onboard status --config {config_path}")
    return 0 if state == "PROVISIONED" else 1


def _demo_token(root: Path) -> Pkcs11Config:
    """A SoftHSM2 token in the demo's folder, which the factory gives the claim key (--pkcs11)."""
    from hub_onboarding.tools import softhsm

    _step("initialising a SoftHSM2 token 'hub' (the hub's secure element, PKCS#11)")
    token = softhsm.make_token(root / "softhsm")
    softhsm.activate(token)
    print(f"    module {token.module_path}")
    print(f"    user PIN in {token.pin_path} (0600); the claim key goes into the token, not into a file")
    return token.config()


def _show_token_key(config_path: Path, token: Pkcs11Config) -> None:
    """Where the permanent key is: an object in the token, sensitive and never extractable."""
    from hub_onboarding.pkcs11 import Pkcs11CredentialStore, TokenUri

    uri = json.loads(config_path.read_text(encoding="utf-8"))["rw"]["iot_permanent_pk_path"]
    described = Pkcs11CredentialStore(token).describe_key(TokenUri.parse(uri).label)
    _step("the permanent key lives in the token")
    print(
        f"    {uri}: {described['count']} object, sensitive {described['sensitive'][0]}, "
        f"extractable {described['extractable'][0]}"
    )
    keys = [p.name for p in config_path.parent.rglob("*") if p.is_file() and b"PRIVATE KEY" in p.read_bytes()]
    print(f"    private key files beside the config: {len(keys)}")


if __name__ == "__main__":
    sys.exit(run_demo())
