{{- define "istiod.name" -}}istiod-{{ .Values.revision }}{{- end }}

{{- define "istiod.selectorLabels" -}}
app: istiod
istio.io/rev: {{ .Values.revision | quote }}
{{- end }}

{{- define "istiod.componentsNamespace" -}}{{ .Values.namespace | default .Release.Namespace }}{{- end }}

{{/* istiod.address: the xDS/CA endpoint proxies of this revision use. */}}
{{- define "istiod.address" -}}istiod-{{ .Values.revision }}.{{ .Release.Namespace }}.svc:15012{{- end }}

{{/* istiod.meshConfig: the mesh config of this revision. */}}
{{- define "istiod.meshConfig" -}}
{{- $base := dict
  "rootNamespace" .Release.Namespace
  "trustDomain" .Values.trustDomain
  "enablePrometheusMerge" true
  "accessLogFile" ""
  "defaultConfig" (dict
    "discoveryAddress" (include "istiod.address" .)
    "proxyMetadata" (dict))
}}
{{- toYaml (mergeOverwrite $base (deepCopy .Values.meshConfig)) }}
{{- end }}
