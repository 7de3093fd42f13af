-- The sample commerce backend the support team's tools act on. Only the tool gateway
-- holds credentials for it; agents never do.
CREATE SCHEMA IF NOT EXISTS shop;

CREATE TABLE IF NOT EXISTS shop.customers (
    id          text PRIMARY KEY,
    email       text NOT NULL,          -- not unique: two accounts share one address
    tier        text NOT NULL DEFAULT 'standard',
    created_at  timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS shop.orders (
    id              text PRIMARY KEY,
    customer_id     text NOT NULL REFERENCES shop.customers (id),
    total_cents     bigint NOT NULL CHECK (total_cents >= 0),
    payment_method  text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.refunds (
    id               bigserial PRIMARY KEY,
    order_id         text NOT NULL REFERENCES shop.orders (id),
    customer_id      text NOT NULL REFERENCES shop.customers (id),
    amount_cents     bigint NOT NULL CHECK (amount_cents > 0),
    reason           text NOT NULL DEFAULT '',
    idempotency_key  text NOT NULL UNIQUE,
    reversed_at      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.subscriptions (
    id            text PRIMARY KEY,
    customer_id   text NOT NULL REFERENCES shop.customers (id),
    plan          text NOT NULL,
    status        text NOT NULL DEFAULT 'active',
    cancelled_at  timestamptz
);

CREATE TABLE IF NOT EXISTS shop.tickets (
    id           bigserial PRIMARY KEY,
    customer_id  text NOT NULL REFERENCES shop.customers (id),
    subject      text NOT NULL,
    body         text NOT NULL DEFAULT '',
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.email_outbox (
    id           bigserial PRIMARY KEY,
    customer_id  text NOT NULL REFERENCES shop.customers (id),
    to_address   text NOT NULL,
    subject      text NOT NULL,
    body         text NOT NULL,
    corrects     bigint REFERENCES shop.email_outbox (id),
    created_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS shop.service_logs (
    id           bigserial PRIMARY KEY,
    customer_id  text NOT NULL REFERENCES shop.customers (id),
    level        text NOT NULL,
    message      text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
