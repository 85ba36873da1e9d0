-- Why a refund was made, as its client said (RefundRequest.reason). The API
-- took it from the start and kept it nowhere; refunds recorded before this
-- migration have none.
ALTER TABLE refunds ADD COLUMN reason text;
