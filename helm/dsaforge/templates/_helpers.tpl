{{/* Names: every resource is <fullname>-<component>, truncated to 63 characters. */}}
{{- define "dsaforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "dsaforge.fullname" -}}
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

{{- define "dsaforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Call with (dict "root" $ "component" "mlflow"). */}}
{{- define "dsaforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dsaforge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "dsaforge.labels" -}}
helm.sh/chart: {{ include "dsaforge.chart" .root }}
{{ include "dsaforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dsaforge
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The label that admits a pod to MLflow through its NetworkPolicy. */}}
{{- define "dsaforge.mlflowClientLabel" -}}
dsaforge.io/mlflow-client: "true"
{{- end }}

{{/* Images. */}}
{{- define "dsaforge.imageRef" -}}
{{- if .digest }}{{ printf "%s@%s" .repository .digest }}{{ else }}{{ printf "%s:%s" .repository .tag }}{{ end }}
{{- end }}

{{/* The CPU image (servers, jobs, CPU stages) and the CUDA image (GPU stages). */}}
{{- define "dsaforge.image" -}}
{{- $img := .Values.images.cpu }}
{{- include "dsaforge.imageRef" (dict "repository" $img.repository "digest" $img.digest "tag" (default .Chart.AppVersion $img.tag)) }}
{{- end }}

{{- define "dsaforge.gpuImage" -}}
{{- $img := .Values.images.gpu }}
{{- include "dsaforge.imageRef" (dict "repository" $img.repository "digest" $img.digest "tag" (default .Chart.AppVersion $img.tag)) }}
{{- end }}

{{/* Service names and the URL every pod uses for MLflow. */}}
{{- define "dsaforge.mlflow.fullname" -}}{{ include "dsaforge.fullname" . }}-mlflow{{- end }}
{{- define "dsaforge.postgresql.fullname" -}}{{ include "dsaforge.fullname" . }}-postgresql{{- end }}
{{- define "dsaforge.minio.fullname" -}}{{ include "dsaforge.fullname" . }}-minio{{- end }}
{{- define "dsaforge.console.fullname" -}}{{ include "dsaforge.fullname" . }}-console{{- end }}

{{- define "dsaforge.mlflow.url" -}}
{{- printf "http://%s.%s.svc.%s:%d" (include "dsaforge.mlflow.fullname" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.port) }}
{{- end }}

{{/* Secrets: the chart's generated one unless the user named an existing one. */}}
{{- define "dsaforge.mlflow.authSecret" -}}
{{- default .Values.pipelines.trackingSecret .Values.mlflow.auth.existingSecret }}
{{- end }}

{{- define "dsaforge.database.secret" -}}
{{- if .Values.postgresql.enabled }}
{{- default (include "dsaforge.postgresql.fullname" .) .Values.postgresql.existingSecret }}
{{- else }}
{{- .Values.mlflow.database.existingSecret }}
{{- end }}
{{- end }}

{{- define "dsaforge.database.passwordKey" -}}
{{- if .Values.postgresql.enabled }}password{{ else }}{{ .Values.mlflow.database.passwordKey }}{{ end }}
{{- end }}

{{- define "dsaforge.artifacts.secret" -}}
{{- if .Values.minio.enabled }}
{{- default (include "dsaforge.minio.fullname" .) .Values.minio.existingSecret }}
{{- else }}
{{- .Values.mlflow.artifacts.existingSecret }}
{{- end }}
{{- end }}

{{- define "dsaforge.artifacts.endpoint" -}}
{{- if .Values.minio.enabled }}
{{- printf "http://%s.%s.svc.%s:9000" (include "dsaforge.minio.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- .Values.mlflow.artifacts.endpointUrl }}
{{- end }}
{{- end }}

{{- define "dsaforge.console.secret" -}}
{{- default (include "dsaforge.console.fullname" .) .Values.console.existingSecret }}
{{- end }}

{{/*
A generated secret value, kept across upgrades: the value already in the cluster when there is one, else a new
random one. Call with (dict "root" $ "name" SECRET "key" KEY "length" N). Returns base64.
*/}}
{{- define "dsaforge.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- if and $existing $existing.data (hasKey $existing.data .key) }}
{{- index $existing.data .key }}
{{- else }}
{{- randAlphaNum (int .length) | b64enc }}
{{- end }}
{{- end }}

{{/*
Artifact-store credentials as env (AWS_* and MLFLOW_S3_ENDPOINT_URL, MLflow's and boto3's names).
*/}}
{{- define "dsaforge.artifacts.env" -}}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "dsaforge.artifacts.secret" . }}
      key: {{ if .Values.minio.enabled }}root-user{{ else }}{{ .Values.mlflow.artifacts.accessKeyIdKey }}{{ end }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "dsaforge.artifacts.secret" . }}
      key: {{ if .Values.minio.enabled }}root-password{{ else }}{{ .Values.mlflow.artifacts.secretAccessKeyKey }}{{ end }}
{{- with (include "dsaforge.artifacts.endpoint" .) }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.mlflow.artifacts.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{/*
The env of every MLflow client pod (stages, the console): the tracking URI and the credentials, from Secrets.
*/}}
{{- define "dsaforge.trackingEnv" -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "dsaforge.mlflow.url" . | quote }}
- name: MLFLOW_TRACKING_USERNAME
  value: {{ .Values.mlflow.auth.adminUsername | quote }}
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dsaforge.mlflow.authSecret" . }}
      key: MLFLOW_TRACKING_PASSWORD
{{- if not .Values.mlflow.artifacts.proxied }}
{{ include "dsaforge.artifacts.env" . }}
{{- end }}
{{- end }}

{{/* Security contexts. */}}
{{- define "dsaforge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.securityContext.runAsUser }}
runAsGroup: {{ .Values.securityContext.runAsGroup }}
fsGroup: {{ .Values.securityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "dsaforge.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end }}

{{/* Checks that refuse contradictory values with one clear message each. */}}
{{- define "dsaforge.validate" -}}
{{- if and (not .Values.postgresql.enabled) (not .Values.mlflow.database.host) }}
{{- fail "postgresql.enabled=false needs mlflow.database.host (the external PostgreSQL server)" }}
{{- end }}
{{- if and (not .Values.postgresql.enabled) (not .Values.mlflow.database.existingSecret) }}
{{- fail "postgresql.enabled=false needs mlflow.database.existingSecret (a Secret with the database password)" }}
{{- end }}
{{- if and (not .Values.minio.enabled) (not .Values.mlflow.artifacts.existingSecret) }}
{{- fail "minio.enabled=false needs mlflow.artifacts.existingSecret (a Secret with the S3 access keys)" }}
{{- end }}
{{- if and .Values.mlflow.ingress.enabled (not .Values.mlflow.ingress.host) }}
{{- fail "mlflow.ingress.enabled=true needs mlflow.ingress.host" }}
{{- end }}
{{- if and .Values.console.enabled .Values.console.ingress.enabled (not .Values.console.ingress.host) }}
{{- fail "console.ingress.enabled=true needs console.ingress.host" }}
{{- end }}
{{- if and .Values.mlflow.ingress.enabled .Values.networkPolicy.enabled (not .Values.networkPolicy.mlflowFrom) }}
{{- fail "mlflow.ingress.enabled=true with networkPolicy.enabled=true needs networkPolicy.mlflowFrom (a peer for the ingress controller), or the Ingress cannot reach MLflow" }}
{{- end }}
{{- range .Values.sandbox.stages }}
{{- if not (hasKey $.Values.pipelines.stages .) }}
{{- fail (printf "sandbox.stages names %q, which is not a stage in pipelines.stages" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* The env of the MLflow server and its migration job: database, artifact store (+ auth for the server). */}}
{{- define "dsaforge.mlflow.storeEnv" -}}
- name: HOME
  value: /tmp
- name: DSAFORGE_DB_HOST
  value: {{ ternary (printf "%s.%s.svc.%s" (include "dsaforge.postgresql.fullname" .) .Release.Namespace .Values.clusterDomain) .Values.mlflow.database.host .Values.postgresql.enabled | quote }}
- name: DSAFORGE_DB_PORT
  value: {{ ternary 5432 .Values.mlflow.database.port .Values.postgresql.enabled | quote }}
- name: DSAFORGE_DB_NAME
  value: {{ .Values.mlflow.database.name | quote }}
- name: DSAFORGE_DB_USER
  value: {{ .Values.mlflow.database.user | quote }}
- name: DSAFORGE_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "dsaforge.database.secret" . }}
      key: {{ include "dsaforge.database.passwordKey" . }}
{{- if not .Values.postgresql.enabled }}
- name: DSAFORGE_DB_SSLMODE
  value: {{ .Values.mlflow.database.sslMode | quote }}
{{- end }}
- name: DSAFORGE_ARTIFACTS_BUCKET
  value: {{ .Values.mlflow.artifacts.bucket | quote }}
- name: DSAFORGE_ARTIFACTS_PROXIED
  value: {{ .Values.mlflow.artifacts.proxied | quote }}
{{ include "dsaforge.artifacts.env" . }}
{{- end }}

{{/* Host headers MLflow accepts: its Service names, the Ingress host, localhost (probes), and the extra patterns. */}}
{{- define "dsaforge.mlflow.allowedHosts" -}}
{{- $svc := include "dsaforge.mlflow.fullname" . }}
{{- $hosts := list "localhost" $svc (printf "%s.%s" $svc .Release.Namespace) (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.%s" $svc .Release.Namespace .Values.clusterDomain) }}
{{- if .Values.mlflow.ingress.enabled }}{{ $hosts = append $hosts .Values.mlflow.ingress.host }}{{ end }}
{{- $out := list }}
{{- range $hosts }}{{ $out = append $out . }}{{ $out = append $out (printf "%s:*" .) }}{{ end }}
{{- concat $out .Values.mlflow.allowedHosts | join "," }}
{{- end }}

{{- define "dsaforge.tmpVolumeMount" -}}
- name: tmp
  mountPath: /tmp
{{- end }}

{{- define "dsaforge.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- end }}

{{- define "dsaforge.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dsaforge.mlflow.health" -}}
path: /health
port: http
httpHeaders:
  - name: Host
    value: localhost
{{- end }}

{{- define "dsaforge.launcher.fullname" -}}{{ include "dsaforge.fullname" . }}-launcher{{- end }}
{{- define "dsaforge.stageSA.fullname" -}}{{ include "dsaforge.fullname" . }}-stage{{- end }}
{{- define "dsaforge.sandboxSA.fullname" -}}{{ include "dsaforge.fullname" . }}-sandbox{{- end }}
{{- define "dsaforge.stageTemplate.name" -}}{{ include "dsaforge.fullname" .root }}-stage-{{ .stage }}{{- end }}

{{/* The profile of a stage: "sandbox" for stages that run untrusted code, else "restricted". */}}
{{- define "dsaforge.stageProfile" -}}
{{- if has .stage .root.Values.sandbox.stages }}sandbox{{ else }}restricted{{ end }}
{{- end }}

{{/* The MLflow URL users' browsers reach, for the console's links. */}}
{{- define "dsaforge.console.mlflowUrl" -}}
{{- if .Values.console.mlflowUrl }}{{ .Values.console.mlflowUrl }}
{{- else if .Values.mlflow.ingress.enabled }}http{{ if .Values.mlflow.ingress.tlsSecretName }}s{{ end }}://{{ .Values.mlflow.ingress.host }}
{{- end }}
{{- end }}
