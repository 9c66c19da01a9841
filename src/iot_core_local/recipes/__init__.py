"""Customer-side set-up recipes: what a hub maker runs in its own AWS account, through public APIs only.

`claims` creates what fleet provisioning by claim needs (a template, the hub policy, a claim policy and a
claim certificate); `jitr` is a maker's device CA and the activator a JITR account runs. Both work against
real AWS IoT Core as well as against the stand-in, so they import nothing of the server: only boto3-style
clients, MQTT, and `iot_core_local.model` for the spelling of AWS's statuses.
"""
