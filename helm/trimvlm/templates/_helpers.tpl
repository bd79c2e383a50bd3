{{/* Chart name, truncated to the 63 characters DNS names allow. */}}
{{- define "trimvlm.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already holds it. */}}
{{- define "trimvlm.fullname" -}}
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

{{- define "trimvlm.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trimvlm.selectorLabels" -}}
app.kubernetes.io/name: {{ include "trimvlm.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trimvlm.labels" -}}
helm.sh/chart: {{ include "trimvlm.chart" . }}
{{ include "trimvlm.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
{{- end }}

{{- define "trimvlm.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "trimvlm.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The container image: the GPU build when gpu.enabled. */}}
{{- define "trimvlm.image" -}}
{{- if .Values.gpu.enabled }}
{{- printf "%s:%s" .Values.image.gpuRepository (default (printf "%s-gpu" .Chart.AppVersion) .Values.image.gpuTag) }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "trimvlm.apiKeySecretName" -}}
{{- default (printf "%s-api-key" (include "trimvlm.fullname" .)) .Values.apiKey.existingSecret }}
{{- end }}

{{/* TRIMVLM_MODELS_DIR: the baked-in repository or the mounted one. */}}
{{- define "trimvlm.modelsDir" -}}
{{- if eq .Values.models.source "image" }}/app/models{{ else }}{{ .Values.models.mountPath }}{{ end }}
{{- end }}

{{- define "trimvlm.device" -}}
{{- if .Values.gpu.enabled }}{{ .Values.gpu.device }}{{ else }}{{ .Values.config.device }}{{ end }}
{{- end }}

{{/* The Chroma server's name and URL (the gallery shared by every replica): `gallery.chroma.url`, else the
chart's own StatefulSet behind its Service. */}}
{{- define "trimvlm.chromaName" -}}
{{- printf "%s-chroma" (include "trimvlm.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "trimvlm.chromaDeployed" -}}
{{- if and (eq .Values.gallery.backend "chroma") (not .Values.gallery.chroma.url) }}true{{ end }}
{{- end }}

{{- define "trimvlm.chromaSelectorLabels" -}}
app.kubernetes.io/name: {{ printf "%s-chroma" (include "trimvlm.name" .) | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "trimvlm.galleryUrl" -}}
{{- default (printf "http://%s:%d" (include "trimvlm.chromaName" .) (int .Values.gallery.chroma.port)) .Values.gallery.chroma.url }}
{{- end }}

{{/* The embedded gallery belongs to one process: refuse what would split it across pods. */}}
{{- define "trimvlm.checkGallery" -}}
{{- if eq .Values.gallery.backend "embedded" }}
{{- if .Values.autoscaling.enabled }}
{{- fail "gallery.backend=embedded keeps the retrieval gallery inside one pod, so an HPA (autoscaling.enabled) would split it across pods (each searching only what was indexed through it) and lose it on scale-down: set gallery.backend=chroma (a shared Chroma server) or disable autoscaling" }}
{{- end }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "gallery.backend=embedded keeps the retrieval gallery inside one pod, so replicaCount=%d would split it across pods (each searching only what was indexed through it): set replicaCount=1, or gallery.backend=chroma (a shared Chroma server)" (int .Values.replicaCount)) }}
{{- end }}
{{- end }}
{{- end }}
