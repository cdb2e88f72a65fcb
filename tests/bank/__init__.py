"""The bank test: replicas, PostgreSQL and the network between them fail on a
schedule while callers charge and fund accounts; a checker proves no
acknowledged charge is lost or applied twice and no balance goes negative."""
