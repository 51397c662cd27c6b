{{/* The chart name, shortened to 63 characters (a DNS label). */}}
{{- define "catalog-bridge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name: the release name, followed by the chart name unless it contains it. */}}
{{- define "catalog-bridge.fullname" -}}
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

{{- define "catalog-bridge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "catalog-bridge.labels" -}}
helm.sh/chart: {{ include "catalog-bridge.chart" . }}
{{ include "catalog-bridge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: catalog-bridge
{{- end }}

{{- define "catalog-bridge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "catalog-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "catalog-bridge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "catalog-bridge.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The leader Lease, in the release namespace. */}}
{{- define "catalog-bridge.leaseName" -}}
{{- include "catalog-bridge.fullname" . }}
{{- end }}

{{/* The Secret in the release namespace where the ZooKeeper backend keeps its session. */}}
{{- define "catalog-bridge.sessionSecretName" -}}
{{- printf "%s-zk-sessions" (include "catalog-bridge.fullname" .) | trunc 253 }}
{{- end }}

{{- define "catalog-bridge.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}
