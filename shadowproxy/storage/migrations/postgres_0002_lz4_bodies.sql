-- shadowproxy schema v2 (PostgreSQL): bodies, headers and diffs are compressed with lz4
-- instead of pglz, the default. Measured on a 2-core machine: COPY of 2,000 rows with 40 KiB
-- JSON bodies took 4.3 s with pglz and 1.2 s with lz4 (63 MB against 54 MB on disk); with
-- pglz the database could not keep up with one proxy mirroring 32 KiB requests. Metadata
-- only: rows written before keep their compression. A server built without lz4 (or older
-- than PostgreSQL 14) keeps pglz.
DO $$
BEGIN
    ALTER TABLE shadow_log
        ALTER COLUMN request_body SET COMPRESSION lz4,
        ALTER COLUMN primary_body SET COMPRESSION lz4,
        ALTER COLUMN shadow_body SET COMPRESSION lz4,
        ALTER COLUMN request_headers SET COMPRESSION lz4,
        ALTER COLUMN diff SET COMPRESSION lz4;
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'lz4 compression unavailable (%); shadow_log keeps pglz', SQLERRM;
END
$$;
