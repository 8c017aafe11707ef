-- A project's name is unique among the organization's live projects only: after deleting
-- project "ml", the organization can make a new "ml" (the deleted one keeps its id and history).
ALTER TABLE projects DROP CONSTRAINT IF EXISTS projects_organization_id_name_key;
CREATE UNIQUE INDEX IF NOT EXISTS projects_live_name
    ON projects (organization_id, name) WHERE deleted_at IS NULL;
