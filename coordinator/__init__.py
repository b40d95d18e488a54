"""The coordinator: registry, leases, submissions, validation, ledger, policy blobs."""
