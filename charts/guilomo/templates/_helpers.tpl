{{/*
Names. Kubernetes names are at most 63 characters: every helper truncates, and component
names truncate the prefix so that the suffix survives.
*/}}
{{- define "guilomo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "guilomo.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* FULLNAME-SUFFIX within 63 characters: (dict "root" $ "suffix" "mlflow") */}}
{{- define "guilomo.componentName" -}}
{{- $suffix := .suffix | trunc 40 | trimSuffix "-" }}
{{- $prefix := include "guilomo.fullname" .root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{- define "guilomo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "guilomo.labels" -}}
helm.sh/chart: {{ include "guilomo.chart" . }}
{{ include "guilomo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "guilomo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "guilomo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of one component: (dict "root" $ "component" "mlflow") */}}
{{- define "guilomo.componentLabels" -}}
{{ include "guilomo.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "guilomo.componentSelectorLabels" -}}
{{ include "guilomo.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "guilomo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "guilomo.componentName" (dict "root" . "suffix" "pipeline")) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* An image reference: (dict "image" .Values.image "default" $.Chart.AppVersion).
A digest wins over a tag; a tag defaults to the app version; `latest` is refused. */}}
{{- define "guilomo.imageRef" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- $tag := default .default .image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail (printf "image %s: the tag `latest` is not allowed; use a version tag or a digest" .image.repository) }}
{{- end }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{- define "guilomo.image" -}}
{{- include "guilomo.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) }}
{{- end }}

{{/* The MLflow server image: its own values, else the guilomo image. */}}
{{- define "guilomo.mlflow.image" -}}
{{- $img := .Values.mlflow.image }}
{{- if $img.repository }}
{{- include "guilomo.imageRef" (dict "image" $img "default" .Chart.AppVersion) }}
{{- else }}
{{- $merged := dict "repository" .Values.image.repository "tag" (default .Values.image.tag $img.tag) "digest" (default .Values.image.digest $img.digest) }}
{{- include "guilomo.imageRef" (dict "image" $merged "default" .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* checkov skip annotations shared by workloads; an image without a digest adds one. */}}
{{- define "guilomo.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_15=Images are referenced by immutable version tags or digests, so IfNotPresent is safe and spares a registry round trip per pod
checkov.io/skip2: CKV_K8S_35=MLflow, boto3 and guilomo.storage read credentials from AWS_* environment variables; they come from a Secret via secretKeyRef and are never in the manifest
{{- if not .digest }}
checkov.io/skip3: CKV_K8S_43=No digest configured; images are pinned by version tag. Set image.digest (printed by guilomo image push) to pin by digest
{{- end }}
{{- end }}

{{- define "guilomo.s3SecretName" -}}
{{- default (include "guilomo.componentName" (dict "root" . "suffix" "s3")) .Values.s3.existingSecret }}
{{- end }}

{{- define "guilomo.s3Credentials" -}}
{{- or .Values.s3.existingSecret (and .Values.s3.accessKeyId .Values.s3.secretAccessKey) }}
{{- end }}

{{- define "guilomo.postgresql.fullname" -}}
{{- include "guilomo.componentName" (dict "root" . "suffix" "postgresql") }}
{{- end }}

{{- define "guilomo.postgresql.secretName" -}}
{{- default (include "guilomo.postgresql.fullname" .) .Values.postgresql.auth.existingSecret }}
{{- end }}

{{- define "guilomo.postgresql.secretKey" -}}
{{- if .Values.postgresql.auth.existingSecret }}{{ .Values.postgresql.auth.existingSecretKey }}{{ else }}password{{ end }}
{{- end }}

{{- define "guilomo.database.secretName" -}}
{{- default (include "guilomo.componentName" (dict "root" . "suffix" "db")) .Values.database.external.existingSecret }}
{{- end }}

{{- define "guilomo.database.secretKey" -}}
{{- if .Values.database.external.existingSecret }}{{ .Values.database.external.existingSecretKey }}{{ else }}uri{{ end }}
{{- end }}

{{- define "guilomo.mlflow.fullname" -}}
{{- include "guilomo.componentName" (dict "root" . "suffix" "mlflow") }}
{{- end }}

{{/* The tracking URI pipeline pods use. */}}
{{- define "guilomo.mlflow.uri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "guilomo.mlflow.fullname" .) .Release.Namespace (int .Values.mlflow.port) }}
{{- else }}
{{- .Values.mlflow.externalUri }}
{{- end }}
{{- end }}

{{/* Host header values the server accepts: its Service names, with and without the port. */}}
{{- define "guilomo.mlflow.allowedHosts" -}}
{{- $svc := include "guilomo.mlflow.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $port := int .Values.mlflow.port }}
{{- $hosts := list }}
{{- range (list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns)) }}
{{- $hosts = append $hosts (printf "%s:%d" . $port) }}
{{- $hosts = append $hosts . }}
{{- end }}
{{- join "," (concat $hosts .Values.mlflow.allowedHosts | uniq) }}
{{- end }}

{{- define "guilomo.s3Uri" -}}
{{- printf "s3://%s/%s" .root.Values.s3.bucket (.prefix | trimPrefix "/" | trimSuffix "/") }}
{{- end }}

{{/* The GPU pool by name (dict "root" $ "name" NAME), as YAML; fails for an unknown name. */}}
{{- define "guilomo.gpuPool" -}}
{{- $found := dict }}
{{- range .root.Values.gpuPools.pools }}
{{- if eq .name $.name }}{{ $found = . }}{{ end }}
{{- end }}
{{- if not $found }}
{{- fail (printf "GPU pool %q is not in gpuPools.pools; add it there or choose one of the pools defined" .name) }}
{{- end }}
{{- toYaml $found }}
{{- end }}

{{/* Pod-level defaults every pod template gets. */}}
{{- define "guilomo.podDefaults" -}}
automountServiceAccountToken: false
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
