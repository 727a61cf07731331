"""kseries: one kernel patch series, from data to ready to mail, built and proven."""
