-- An issued invoice never changes: it keeps the organization's name as it was when issued (a
-- rename later shows on later invoices only). Invoices issued before this keep today's name.
ALTER TABLE invoices ADD COLUMN IF NOT EXISTS organization_name text;
UPDATE invoices i SET organization_name = o.name
FROM organizations o WHERE o.id = i.organization_id AND i.organization_name IS NULL;
