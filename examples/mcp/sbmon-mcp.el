;;; sbmon-mcp.el --- sbmon as an MCP server for Emacs (mcp.el, used by gptel)  -*- lexical-binding: t; -*-
;;
;; Watches every SBCL image that started the sbmon agent as the same user.  To have
;; sbmon start the Lisp instead, use the launch entry.
(with-eval-after-load 'mcp-hub
  (add-to-list 'mcp-hub-servers
               '("sbmon" . (:command "sbmon" :args ("serve" "--stdio"))))
  (add-to-list 'mcp-hub-servers
               '("sbcl-app" . (:command "sbmon"
                               :args ("launch" "--stdio" "--" "--load" "/path/to/app.lisp")))))
