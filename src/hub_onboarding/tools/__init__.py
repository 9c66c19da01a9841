"""Tooling around onboarding that a hub does not need: the demo, the fleet simulator, the factory writer.

These are the only hub_onboarding modules that import the stand-in (iot_core_local); nothing on the
provisioning path imports this package.
"""
