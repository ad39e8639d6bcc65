"""The service: many scans on one loaded bundle (the HTTP app, its job queue and worker, DICOM networking, the
audit trail, and the worklists of batch reports)."""
