-- dd_require(condition, message): true, or an error that aborts the calling
-- statement. A write done as one statement (and so its own transaction) can
-- check what it assumed before it ran, and undo everything it did if that
-- turned out false: see Ledger.write_purchases.
CREATE FUNCTION dd_require(condition boolean, message text) RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF NOT condition THEN
        RAISE EXCEPTION USING ERRCODE = 'DD001', MESSAGE = message;
    END IF;
    RETURN true;
END $$;
