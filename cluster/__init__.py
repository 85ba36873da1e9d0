"""Running the system: configuration, embedded servers, the launcher and CLI,
and the referral-network simulator that feeds the demo, benchmark and tests."""
