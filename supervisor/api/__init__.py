"""corral's HTTP/SSE API (``corral api run``, started by ``corral up``): a front door for web
chats, help desks and backend services, over starlette and uvicorn.

It holds a NATS identity of its own (``api``) and no database credentials: conversations
start and go on through the supervisor's inputs, operator actions through the operators'
desk, and what it reads (API keys, conversations, the queue) it asks the supervisor for.
Every request carries an API key (``corral api-key create``); a key acts as its client,
for its customer if it names one, and only an operator's key reaches the operator
endpoints.
"""
