{{/*
Checks across values that values.schema.json cannot express. Each failure says which value
is wrong and what to set instead.
*/}}
{{- define "guilomo.validateValues" -}}
{{- $v := .Values }}
{{- if not $v.s3.bucket }}
{{- fail "s3.bucket: set the bucket of the pipeline root and the MLflow artifacts (it must exist)" }}
{{- end }}
{{- if and (not $v.s3.existingSecret) (ne (empty $v.s3.accessKeyId) (empty $v.s3.secretAccessKey)) }}
{{- fail "s3: set both s3.accessKeyId and s3.secretAccessKey, or s3.existingSecret, or neither (IAM role for the service account)" }}
{{- end }}
{{- if eq $v.database.type "external" }}
{{- if not (or $v.database.external.uri $v.database.external.existingSecret) }}
{{- fail "database.type=external: set database.external.existingSecret (a Secret holding the URI) or database.external.uri" }}
{{- end }}
{{- end }}
{{- if eq $v.database.type "postgresql" }}
{{- if not (or $v.postgresql.auth.password $v.postgresql.auth.existingSecret) }}
{{- fail "database.type=postgresql: set postgresql.auth.existingSecret or postgresql.auth.password (the bundled database needs a password)" }}
{{- end }}
{{- end }}
{{- if and (eq $v.database.type "sqlite") (gt (int $v.mlflow.workers) 1) }}
{{- fail (printf "mlflow.workers=%v with database.type=sqlite: sqlite takes one writer; use 1 worker or a postgresql / external database" $v.mlflow.workers) }}
{{- end }}
{{- if and (not $v.mlflow.enabled) (not $v.mlflow.externalUri) }}
{{- fail "mlflow.enabled=false: set mlflow.externalUri to the tracking server the pipeline should log to" }}
{{- end }}
{{- $names := list }}
{{- range $v.gpuPools.pools }}
{{- if has .name $names }}
{{- fail (printf "gpuPools.pools: the name %q appears twice; pool names must be unique" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- end }}
{{- if not (has $v.gpuPools.default $names) }}
{{- fail (printf "gpuPools.default=%q is not a pool in gpuPools.pools (%s)" $v.gpuPools.default (join ", " $names)) }}
{{- end }}
{{- $job := $v.trainer.pytorchJob }}
{{- if $job.enabled }}
{{- range (list "dataset" "allocation" "out" "checkpoints") }}
{{- if not (get $job .) }}
{{- fail (printf "trainer.pytorchJob.enabled: set trainer.pytorchJob.%s (an s3:// URI)" .) }}
{{- end }}
{{- end }}
{{- if not (get $job.sftConfig "base_model") }}
{{- fail "trainer.pytorchJob.enabled: set trainer.pytorchJob.sftConfig.base_model (the model the adapter trains on)" }}
{{- end }}
{{- $pool := include "guilomo.gpuPool" (dict "root" . "name" (default $v.gpuPools.default $job.pool)) | fromYaml }}
{{- if and (eq (int $job.gpusPerNode) 0) (eq (int $pool.gpuCount) 0) }}
{{- fail (printf "trainer.pytorchJob: pool %q has gpuCount 0; set trainer.pytorchJob.gpusPerNode or use a GPU pool" $pool.name) }}
{{- end }}
{{- end }}
{{- end }}
