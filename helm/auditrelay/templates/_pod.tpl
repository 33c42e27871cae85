{{/*
The pod: an init container copies out_auditrelay.so from our image into an emptyDir (the Fluent
Bit image stays the official one) and prepares the sidecar's spool directory on the node; Fluent
Bit tails the audit log and loads the plugin; the sidecar receives over a Unix socket in a shared
emptyDir.
*/}}
{{- define "auditrelay.pod" -}}
{{- $sidecarImage := include "auditrelay.image" (list .Values.sidecar.image .Chart.AppVersion) }}
{{- $auditLogPath := include "auditrelay.auditLogPath" . }}
{{- $auth := .Values.azure.auth -}}
serviceAccountName: {{ include "auditrelay.serviceAccountName" . }}
automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
securityContext:
  {{- $podSecurityContext := merge (dict "fsGroup" .Values.sidecar.runAsGroup) (deepCopy .Values.podSecurityContext) }}
  {{- if .Values.openShift.securityContextConstraints.seLinuxType }}
  {{- $_ := set $podSecurityContext "seLinuxOptions" (dict "type" .Values.openShift.securityContextConstraints.seLinuxType) }}
  {{- end }}
  {{- toYaml $podSecurityContext | nindent 2 }}
initContainers:
  - name: install-plugin
    image: {{ $sidecarImage }}
    imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
    command: [cp, {{ include "auditrelay.imagePluginPath" . }}, /plugins/out_auditrelay.so]
    securityContext:
      {{- toYaml (merge (dict "runAsUser" .Values.sidecar.runAsUser "runAsGroup" .Values.sidecar.runAsGroup) (deepCopy .Values.sidecar.securityContext)) | nindent 6 }}
    volumeMounts:
      - name: plugins
        mountPath: /plugins
  # The spool directory on the node belongs to the sidecar's user: creating and chowning it is the
  # one step that needs root, with CHOWN and FOWNER only.
  - name: prepare-state
    image: {{ $sidecarImage }}
    imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
    command:
      - install
      - -d
      - -o
      - {{ .Values.sidecar.runAsUser | quote }}
      - -g
      - {{ .Values.sidecar.runAsGroup | quote }}
      - -m
      - "0700"
      - /state/sidecar
    securityContext:
      runAsUser: 0
      runAsGroup: 0
      runAsNonRoot: false
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities:
        drop: [ALL]
        add: [CHOWN, FOWNER]
    volumeMounts:
      - name: state
        mountPath: /state
  {{- with .Values.initContainers }}
  {{- if kindIs "string" . }}
  {{- tpl . $ | nindent 2 }}
  {{- else }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- end }}
  {{- if include "auditrelay.nativeSidecar" . }}
  {{- include "auditrelay.sidecarContainer" . | nindent 2 }}
  {{- end }}
containers:
  - name: fluent-bit
    image: {{ include "auditrelay.image" (list .Values.image .Values.image.tag) }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: [/fluent-bit/bin/fluent-bit]
    args:
      {{- toYaml .Values.args | nindent 6 }}
      {{- if .Values.hotReload.enabled }}
      - --enable-hot-reload
      {{- end }}
    {{- if or .Values.env (eq $auth.method "clientSecret") }}
    env:
      {{- if eq $auth.method "clientSecret" }}
      # Fluent Bit expands ${{ include "auditrelay.clientSecretEnv" . }} in the output section; the value
      # never appears in the ConfigMap.
      - name: {{ include "auditrelay.clientSecretEnv" . }}
        valueFrom:
          secretKeyRef:
            name: {{ $auth.clientSecret.existingSecret }}
            key: {{ $auth.clientSecret.key }}
      {{- end }}
      {{- with .Values.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- end }}
    {{- with .Values.envFrom }}
    envFrom:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    ports:
      - name: http
        containerPort: {{ .Values.metricsPort }}
        protocol: TCP
    {{- with .Values.livenessProbe }}
    livenessProbe:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    {{- if .Values.readinessProbe }}
    readinessProbe:
      {{- include "auditrelay.readinessProbe" . | nindent 6 }}
    {{- end }}
    {{- with .Values.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      {{- toYaml .Values.securityContext | nindent 6 }}
    volumeMounts:
      - name: config
        mountPath: /fluent-bit/etc/conf
        readOnly: true
      - name: plugins
        mountPath: {{ .Values.pluginDirectory }}
        readOnly: true
      - name: socket
        mountPath: {{ include "auditrelay.socketDir" . }}
      - name: audit-log
        mountPath: {{ dir $auditLogPath }}
        readOnly: true
      - name: state
        mountPath: /var/fluent-bit/state
        subPath: fluent-bit
      {{- with .Values.daemonSetVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with .Values.extraVolumeMounts }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
  {{- if not (include "auditrelay.nativeSidecar" .) }}
  {{- include "auditrelay.sidecarContainer" . | nindent 2 }}
  {{- end }}
  {{- if .Values.hotReload.enabled }}
  - name: reloader
    image: {{ include "auditrelay.image" (list .Values.hotReload.image .Values.hotReload.image.tag) }}
    imagePullPolicy: {{ .Values.hotReload.image.pullPolicy }}
    args:
      - --webhook-method=POST
      - --webhook-url=http://localhost:{{ .Values.metricsPort }}/api/v2/reload
      - --volume-dir=/watch/config
      {{- range .Values.hotReload.extraWatchVolumes }}
      - --volume-dir=/watch/{{ . }}
      {{- end }}
    {{- with .Values.hotReload.resources }}
    resources:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    securityContext:
      runAsUser: 65532
      runAsGroup: 65532
      runAsNonRoot: true
      readOnlyRootFilesystem: true
      allowPrivilegeEscalation: false
      capabilities:
        drop: [ALL]
    volumeMounts:
      - name: config
        mountPath: /watch/config
        readOnly: true
      {{- range .Values.hotReload.extraWatchVolumes }}
      - name: {{ . }}
        mountPath: /watch/{{ . }}
        readOnly: true
      {{- end }}
  {{- end }}
  {{- with .Values.extraContainers }}
  {{- if kindIs "string" . }}
  {{- tpl . $ | nindent 2 }}
  {{- else }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- end }}
volumes:
  - name: config
    configMap:
      name: {{ default (printf "%s-config" (include "auditrelay.fullname" .)) .Values.existingConfigMap }}
  - name: plugins
    emptyDir:
      sizeLimit: 64Mi
  - name: socket
    emptyDir:
      medium: Memory
      sizeLimit: 1Mi
  - name: tmp
    emptyDir:
      sizeLimit: 64Mi
  - name: audit-log
    hostPath:
      path: {{ dir $auditLogPath }}
      type: Directory
  - name: state
    hostPath:
      path: {{ .Values.stateHostPath }}
      type: DirectoryOrCreate
  {{- with .Values.azure.policy.existingConfigMap }}
  - name: policy
    configMap:
      name: {{ . }}
      items:
        - key: {{ $.Values.azure.policy.key }}
          path: {{ $.Values.azure.policy.key }}
  {{- end }}
  {{- if eq $auth.method "clientCertificate" }}
  - name: client-certificate
    secret:
      secretName: {{ $auth.clientCertificate.existingSecret }}
      defaultMode: 0440
      items:
        - key: {{ $auth.clientCertificate.key }}
          path: {{ $auth.clientCertificate.key }}
  {{- end }}
  {{- if and (eq $auth.method "workloadIdentity") $auth.workloadIdentity.projectedToken }}
  - name: azure-token
    projected:
      defaultMode: 0440
      sources:
        - serviceAccountToken:
            audience: api://AzureADTokenExchange
            expirationSeconds: {{ $auth.workloadIdentity.tokenExpirationSeconds }}
            path: token
  {{- end }}
  {{- with .Values.daemonSetVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
  {{- with .Values.extraVolumes }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The sidecar container; on Kubernetes 1.29+ a native sidecar (an init container that keeps running). */}}
{{- define "auditrelay.sidecarContainer" -}}
- name: sidecar
{{- if include "auditrelay.nativeSidecar" . }}
  # A native sidecar: started before Fluent Bit, stopped after Fluent Bit has flushed.
  restartPolicy: Always
{{- end }}
  image: {{ include "auditrelay.image" (list .Values.sidecar.image .Chart.AppVersion) }}
  imagePullPolicy: {{ .Values.sidecar.image.pullPolicy }}
  args: [serve]
  env:
    - name: AUDITRELAY_LISTEN
      value: {{ include "auditrelay.socketAddress" . | quote }}
    - name: AUDITRELAY_STATE_DIR
      value: {{ include "auditrelay.spoolDir" . | quote }}
    - name: AUDITRELAY_METRICS_ADDRESS
      value: {{ printf "0.0.0.0:%d" (int .Values.sidecar.metricsPort) | quote }}
    - name: AUDITRELAY_LOG_LEVEL
      value: {{ .Values.sidecar.logLevel | quote }}
    - name: AUDITRELAY_LOG_FORMAT
      value: {{ .Values.sidecar.logFormat | quote }}
    {{- with .Values.sidecar.env }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.sidecar.envFrom }}
  envFrom:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  ports:
    - name: sidecar-http
      containerPort: {{ .Values.sidecar.metricsPort }}
      protocol: TCP
  {{- with .Values.sidecar.startupProbe }}
  startupProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.livenessProbe }}
  livenessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.readinessProbe }}
  readinessProbe:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.sidecar.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml (merge (dict "runAsUser" .Values.sidecar.runAsUser "runAsGroup" .Values.sidecar.runAsGroup) (deepCopy .Values.sidecar.securityContext)) | nindent 4 }}
  volumeMounts:
    - name: socket
      mountPath: {{ include "auditrelay.socketDir" . }}
    - name: state
      mountPath: {{ include "auditrelay.spoolDir" . }}
      subPath: sidecar
    - name: tmp
      mountPath: /tmp
    {{- if .Values.azure.policy.existingConfigMap }}
    - name: policy
      mountPath: {{ include "auditrelay.policyDir" . }}
      readOnly: true
    {{- end }}
    {{- if eq .Values.azure.auth.method "clientCertificate" }}
    - name: client-certificate
      mountPath: {{ include "auditrelay.clientCertificateDir" . }}
      readOnly: true
    {{- end }}
    {{- if and (eq .Values.azure.auth.method "workloadIdentity") .Values.azure.auth.workloadIdentity.projectedToken }}
    - name: azure-token
      mountPath: {{ dir (include "auditrelay.projectedTokenPath" .) }}
      readOnly: true
    {{- end }}
    {{- with .Values.sidecar.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end }}
