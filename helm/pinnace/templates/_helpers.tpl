{{/* Names, labels and images shared by the templates. */}}

{{- define "pinnace.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pinnace.operatorName" -}}
{{- printf "%s-operator" (include "pinnace.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "pinnace.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "pinnace.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "pinnace.selectorLabels" -}}
app.kubernetes.io/name: pinnace-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pinnace.labels" -}}
{{ include "pinnace.selectorLabels" . }}
app.kubernetes.io/part-of: pinnace
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "pinnace.operatorImage" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "pinnace.runtimeImage" -}}
{{- printf "%s:%s" .Values.runtime.image.repository (default .Chart.AppVersion .Values.runtime.image.tag) -}}
{{- end -}}
