{{/* Labels of every object of the chart. */}}
{{- define "meshkeeper.labels" -}}
app.kubernetes.io/name: meshkeeper
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector of the manager's pods. */}}
{{- define "meshkeeper.selector" -}}
app.kubernetes.io/name: meshkeeper
app.kubernetes.io/component: manager
{{- end -}}

{{- define "meshkeeper.image" -}}
{{ .Values.manager.image.repository }}:{{ .Values.manager.image.tag | default .Chart.AppVersion }}
{{- end -}}
