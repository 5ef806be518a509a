-- docker-compose.yml only: runs after migrations/*.sql (init scripts run in
-- name order), which create the walcast role without a password.
-- DEMO ONLY: this password is a placeholder, not a secret. It must match the
-- one in the walcast service's WALCAST_DATABASE_URL.
ALTER ROLE walcast PASSWORD 'walcast-demo-password';
