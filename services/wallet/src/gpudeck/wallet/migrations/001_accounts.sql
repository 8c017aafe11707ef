-- Accounts: who the organizations are, who belongs to them, their projects and API tokens.

CREATE TABLE users (
    id          uuid PRIMARY KEY,
    email       text NOT NULL UNIQUE,
    name        text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE organizations (
    id             uuid PRIMARY KEY,
    slug           text UNIQUE,
    name           text NOT NULL,
    owner_user_id  uuid NOT NULL REFERENCES users (id),
    currency       text NOT NULL CHECK (currency IN ('INR', 'USD')),
    plan_code      text NOT NULL DEFAULT 'standard',
    kyc_status     text NOT NULL DEFAULT 'unverified'
                   CHECK (kyc_status IN ('unverified', 'pending', 'verified')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at     timestamptz
);

CREATE TABLE memberships (
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    user_id          uuid NOT NULL REFERENCES users (id),
    role             text NOT NULL CHECK (role IN ('owner', 'admin', 'billing', 'member', 'viewer')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (organization_id, user_id)
);
CREATE INDEX memberships_user ON memberships (user_id);

CREATE TABLE projects (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    name             text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    last_used_at     timestamptz NOT NULL DEFAULT now(),
    deleted_at       timestamptz,
    UNIQUE (organization_id, name)
);

-- The secret is shown once; only its SHA-256 is kept.
CREATE TABLE api_tokens (
    id               uuid PRIMARY KEY,
    organization_id  uuid NOT NULL REFERENCES organizations (id),
    created_by       uuid REFERENCES users (id),
    name             text NOT NULL,
    role             text NOT NULL CHECK (role IN ('owner', 'admin', 'billing', 'member', 'viewer')),
    secret_sha256    bytea NOT NULL UNIQUE,
    created_at       timestamptz NOT NULL DEFAULT now(),
    expires_at       timestamptz,
    revoked_at       timestamptz,
    last_used_at     timestamptz
);
CREATE INDEX api_tokens_organization ON api_tokens (organization_id);
