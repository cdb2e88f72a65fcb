"""orgbilling: organizations' subscriptions, credit pools and allocations over gRPC."""
