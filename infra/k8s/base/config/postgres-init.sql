-- Runs once, when PostgreSQL initialises an empty data directory (docker-entrypoint-initdb.d), as the role
-- POSTGRES_USER, which owns the new database: the user store of MLflow's basic-auth app.
CREATE DATABASE mlflow_auth;
