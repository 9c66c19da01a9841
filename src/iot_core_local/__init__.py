"""iot_core_local: a local stand-in for the parts of AWS IoT Core that onboarding touches."""
