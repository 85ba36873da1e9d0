-- Video jobs may ask for the platform variants (16:9, 9:16, 1:1 crops that
-- follow the saliency): encoding them costs more than the analysis, so it is
-- opt-in. Thumbnails and variants are written under the engine's video
-- folder, outputs/<job_id>/, and served to the job's owner.
ALTER TABLE video_jobs ADD COLUMN variants boolean NOT NULL DEFAULT false;
