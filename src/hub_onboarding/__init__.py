"""hub_onboarding: onboard a smart-home hub to AWS IoT Core."""
