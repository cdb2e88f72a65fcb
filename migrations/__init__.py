"""The ledger's SQL, shipped in the wheel as package data of
orgbilling.migrations and read through importlib.resources."""
