{{/* Chart name, truncated to the DNS label limit. */}}
{{- define "loraswap.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "loraswap.fullname" -}}
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

{{- define "loraswap.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels the server pods are selected by (Service, PDB, HPA target, InferencePool). */}}
{{- define "loraswap.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraswap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "loraswap.labels" -}}
helm.sh/chart: {{ include "loraswap.chart" . }}
app.kubernetes.io/name: {{ include "loraswap.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraswap
{{- end }}

{{- define "loraswap.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraswap.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraswap.image" -}}
{{- $variant := ternary "cuda" "cpu" .Values.gpu.enabled }}
{{- $tag := default (printf "%s-%s" .Chart.AppVersion $variant) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{/* Name of the Secret holding the API keys. */}}
{{- define "loraswap.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "loraswap.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "loraswap.registryClaimName" -}}
{{- default (printf "%s-registry" (include "loraswap.fullname" .)) .Values.registry.persistence.existingClaim }}
{{- end }}

{{/* True (non-empty) when the registry is a volume rather than a URL. */}}
{{- define "loraswap.registryUsesVolume" -}}
{{- if and (not .Values.registry.url) .Values.registry.persistence.enabled }}true{{ end }}
{{- end }}

{{/* The registry location both the server and the training Job use. */}}
{{- define "loraswap.registry" -}}
{{- if .Values.registry.url }}
{{- .Values.registry.url }}
{{- else if .Values.registry.persistence.enabled }}
{{- .Values.registry.mountPath }}
{{- else }}
{{- fail "registry: set registry.url (an fsspec URL) or enable registry.persistence" }}
{{- end }}
{{- end }}

{{/* Environment shared by the server and the training Job: registry, cache, writable homes. */}}
{{- define "loraswap.commonEnv" -}}
- name: LORASWAP_REGISTRY
  value: {{ include "loraswap.registry" . | quote }}
- name: LORASWAP_CACHE_DIR
  value: {{ .Values.cache.mountPath | quote }}
- name: LORASWAP_DEVICE
  value: {{ default (ternary "cuda" "cpu" .Values.gpu.enabled) .Values.server.device | quote }}
{{- with .Values.server.encoderBase }}
- name: LORASWAP_ENCODER_BASE
  value: {{ . | quote }}
{{- end }}
{{- with .Values.server.decoderBase }}
- name: LORASWAP_DECODER_BASE
  value: {{ . | quote }}
{{- end }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" .Values.cache.mountPath | quote }}
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: TRITON_CACHE_DIR
  value: /tmp/triton
{{- end }}

{{/* Volumes shared by the server and the training Job. */}}
{{- define "loraswap.commonVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- if .Values.shmSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.shmSizeLimit }}
{{- end }}
{{- if include "loraswap.registryUsesVolume" . }}
- name: registry
  persistentVolumeClaim:
    claimName: {{ include "loraswap.registryClaimName" . }}
{{- end }}
{{- end }}

{{- define "loraswap.commonVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.cache.mountPath }}
{{- if .Values.shmSizeLimit }}
- name: shm
  mountPath: /dev/shm
{{- end }}
{{- if include "loraswap.registryUsesVolume" . }}
- name: registry
  mountPath: {{ .Values.registry.mountPath }}
{{- end }}
{{- end }}

{{/* Init container: link the base models baked into the image into the writable cache (no copy). */}}
{{- define "loraswap.seedCacheInitContainer" -}}
{{- if .Values.cache.seedFromImage }}
- name: seed-cache
  image: {{ include "loraswap.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command:
    - /bin/sh
    - -c
    - |
      set -eu
      for entry in {{ .Values.cache.imagePath }}/*; do
        [ -e "$entry" ] || continue
        ln -sfn "$entry" {{ .Values.cache.mountPath }}/
      done
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests:
      cpu: 10m
      memory: 16Mi
    limits:
      memory: 64Mi
  volumeMounts:
    - name: cache
      mountPath: {{ .Values.cache.mountPath }}
{{- end }}
{{- end }}
